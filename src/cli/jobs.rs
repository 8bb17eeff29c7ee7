//! `submit`, `status`, `cancel` and `plan`, and following a job.

use super::{connect, control_for, failed, load, usage_error, ConfigArg, JobArgs, EXIT_FAILED};
use crate::control::Control;
use crate::job::parse_job_json;
use crate::state::{JobDocument, JobState};
use crate::views::job_view;
use std::{path::PathBuf, process::ExitCode, time::Duration};

/// `submit`: queues a job, optionally following it.
pub(super) async fn submit(
    config: ConfigArg,
    file: Option<PathBuf>,
    job: JobArgs,
    pool_id: Option<String>,
    job_id: Option<String>,
    wait: bool,
    json: bool,
) -> ExitCode {
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

/// `status`: jobs, one job, or a pool's image sets.
pub(super) async fn status(
    config: ConfigArg,
    job_id: Option<String>,
    watch: bool,
    json: bool,
    pool: Option<String>,
) -> ExitCode {
    let control = match control_for(&config.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(pool) = pool {
        return match control.state.load_pool(&pool).await {
            Ok(Some((r, _))) => {
                if json {
                    let nodes = control.state.pool_nodes(&pool).await.ok().flatten();
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&crate::views::pool_view(&r, nodes.as_ref()))
                            .unwrap()
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
                    let views: Vec<_> = docs.iter().map(crate::views::summary_view).collect();
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({ "jobs": views }))
                            .unwrap()
                    );
                } else if docs.is_empty() {
                    println!("no jobs");
                } else {
                    for d in &docs {
                        println!("{}", status_line(d));
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => failed(e),
        },
    }
}

/// `cancel`: asks for a job to be cancelled.
pub(super) async fn cancel(config: ConfigArg, job_id: String) -> ExitCode {
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

/// `plan`: what a job would make, read only.
pub(super) async fn plan(
    config: ConfigArg,
    job: JobArgs,
    pool_id: String,
    job_id: String,
) -> ExitCode {
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
        println!("  surplus, kept until the pool is retired: {b}");
    }
    ExitCode::SUCCESS
}

fn summary_line(s: &crate::state::JobSummary) -> String {
    format!(
        "{:<40} {:<10} {:<12} {:>3}% {}/{} replicas{}",
        s.job_id,
        s.state.as_str(),
        s.phase.map(|p| p.words()).unwrap_or_else(|| "-".into()),
        (s.progress() * 100.0).round(),
        s.verified,
        s.replicas,
        s.error
            .as_ref()
            .map(|e| format!("  error: {e}"))
            .unwrap_or_default()
    )
}

/// A summary line with the job's elapsed time, throughput and ETA.
fn status_line(s: &crate::state::JobSummary) -> String {
    let t = crate::views::timing_words(&s.timing(time::OffsetDateTime::now_utc()));
    if t.is_empty() {
        summary_line(s)
    } else {
        format!("{}  {t}", summary_line(s))
    }
}

fn print_job(d: &JobDocument, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(&job_view(d)).unwrap());
        return;
    }
    println!("{}", status_line(&crate::state::JobSummary::of(d)));
    if let Some(g) = crate::views::gallery_line(d) {
        println!("  {g}");
    }
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
pub(super) enum Display {
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
        let summary = crate::state::JobSummary::of(d);
        let timing = crate::views::timing_words(&summary.timing(time::OffsetDateTime::now_utc()));
        self.job.set_message(format!(
            "{}{}{}",
            d.state().as_str(),
            d.phase()
                .map(|p| format!(" / {}", p.words()))
                .unwrap_or_default()
                + &crate::views::gallery_line(d)
                    .map(|g| format!(" · {g}"))
                    .unwrap_or_default(),
            if timing.is_empty() {
                String::new()
            } else {
                format!(" · {timing}")
            }
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
pub(super) async fn follow(control: &Control, id: &str, display: Display) -> ExitCode {
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
                        // A new line when something other than the clock
                        // changed (elapsed and ETA count down by themselves).
                        let s = crate::state::JobSummary::of(&d);
                        let gallery = crate::views::gallery_line(&d)
                            .map(|g| format!("  {g}"))
                            .unwrap_or_default();
                        let key = format!(
                            "{}{gallery}{:?}{:?}",
                            summary_line(&s),
                            s.throughput_bytes_per_second,
                            s.eta_at
                        );
                        if key != last {
                            println!("{}{gallery}", status_line(&s));
                            last = key;
                        }
                    }
                }
                if d.state().is_terminal() {
                    if let Some(b) = &bars {
                        b.finish();
                        println!("{}", status_line(&crate::state::JobSummary::of(&d)));
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
