//! The command line (see CONTRACT.md). Exit codes: 0 success, 1 the job failed or
//! was cancelled (or an operation failed), 2 usage or configuration error.

use crate::config::{ConfigError, ProcessSecrets, Settings, ValidatedSettings, DEFAULT_CONFIG};
use crate::control::Control;
use crate::job::{JobSpec, Os, PoolSpec};
use crate::metrics::Metrics;
mod admin;
mod jobs;
mod pools;

use clap::{Args, Parser, Subcommand};
use std::{path::PathBuf, process::ExitCode, sync::Arc};

/// Exit code: the job failed, was cancelled, or the operation failed.
pub(crate) const EXIT_FAILED: u8 = 1;
/// Exit code: bad usage or configuration.
pub(crate) const EXIT_USAGE: u8 = 2;

/// Replicates a custom VHD into the identical copies an Azure Batch pool needs.
///
/// Exit codes: 0 success; 1 the job failed or was cancelled, or the operation
/// failed; 2 usage or configuration error.
#[derive(Debug, Parser)]
#[command(name = "vhd-replicator", version)]
pub(crate) struct Cli {
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
            gallery: None,
            submitted_by: None,
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
        Command::Validate { config, online } => admin::validate(&config.config, online).await,
        Command::Run { config } => admin::run(config).await,
        Command::SampleVhd {
            config,
            url,
            size_mib,
            data_mib,
        } => admin::sample_vhd(config, url, size_mib, data_mib).await,
        Command::Submit {
            config,
            file,
            job,
            pool_id,
            job_id,
            wait,
            json,
        } => jobs::submit(config, file, job, pool_id, job_id, wait, json).await,
        Command::Status {
            config,
            job_id,
            watch,
            json,
            pool,
        } => jobs::status(config, job_id, watch, json, pool).await,
        Command::Cancel { config, job_id } => jobs::cancel(config, job_id).await,
        Command::Plan {
            config,
            job,
            pool_id,
            job_id,
        } => jobs::plan(config, job, pool_id, job_id).await,
        Command::Retire {
            config,
            pool,
            dry_run,
            wait,
        } => pools::retire(config, pool, dry_run, wait).await,
        Command::Gc {
            config,
            dry_run,
            min_age_hours,
        } => pools::gc(config, dry_run, min_age_hours).await,
    }
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
