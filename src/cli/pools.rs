//! `retire` and `gc`.

use super::jobs::{follow, Display};
use super::{connect, control_for, failed, load, usage_error, ConfigArg};
use std::process::ExitCode;

/// `retire`: queues the retirement of a pool's image sets (or lists them).
pub(super) async fn retire(config: ConfigArg, pool: String, dry_run: bool, wait: bool) -> ExitCode {
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

/// `gc`: removes orphans older than the minimum age, prunes old job documents.
pub(super) async fn gc(config: ConfigArg, dry_run: bool, min_age_hours: Option<u64>) -> ExitCode {
    let settings = match load(&config.config) {
        Ok(s) => s,
        Err(e) => return usage_error(e),
    };
    let min_age = time::Duration::hours(min_age_hours.unwrap_or(settings.gc.min_age_hours) as i64);
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
