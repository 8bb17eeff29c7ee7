//! Garbage collection: replicas and source snapshots this daemon made (their
//! metadata names a job) that nothing needs any more, because their job failed,
//! was cancelled or is gone and no pool's image set holds them, and that are older
//! than a minimum age. Blobs without this deployment's owner tag are never
//! touched.

use crate::control::Control;
use crate::plan::{owner_tag, META_JOB, META_OWNER};
use crate::state::JobState;
use crate::storage::BlobPath;
use std::collections::{BTreeSet, HashMap};
use time::OffsetDateTime;

/// Garbage collection could not read or change what it needs.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// Job documents or pool records.
    #[error("garbage collection: {0}")]
    State(#[from] crate::state::StateError),
    /// Listing or deleting blobs.
    #[error("garbage collection: {0}")]
    Storage(#[from] crate::azure::ServiceError),
}

/// What a collection found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Orphans deleted (or, in a dry run, that would be).
    pub orphans: Vec<BlobPath>,
    /// Orphans younger than the minimum age, kept for now.
    pub young: Vec<BlobPath>,
    /// Blobs of ours that are still needed.
    pub needed: usize,
    /// Finished jobs whose documents outlived `gc.job_retention_days`, deleted
    /// (or, in a dry run, that would be).
    pub pruned_jobs: Vec<String>,
}

/// Finds orphans (and deletes them unless `dry_run`).
pub async fn collect(
    control: &Control,
    min_age: time::Duration,
    dry_run: bool,
) -> Result<GcReport, GcError> {
    let jobs = control.state.list().await?.jobs;
    let pools = control.state.list_pools().await?;
    let live: HashMap<String, JobState> =
        jobs.iter().map(|j| (j.job_id.clone(), j.state)).collect();
    let mut protected: BTreeSet<BlobPath> = BTreeSet::new();
    let mut scan: BTreeSet<(String, String)> = BTreeSet::new();
    for p in &pools {
        for set in &p.sets {
            protected.insert(set.source_blob.at_snapshot(&set.source_snapshot));
            scan.insert((
                set.source_blob.account.clone(),
                set.source_blob.container.clone(),
            ));
            for r in &set.replicas {
                protected.insert(r.blob.clone());
                scan.insert((r.blob.account.clone(), r.blob.container.clone()));
            }
        }
    }
    // From the summaries alone: a job's replicas are in its container of some
    // destination account, its snapshot beside its source.
    let destinations = control.settings.destination_accounts();
    for j in &jobs {
        if let Some(container) = &j.container {
            for a in &destinations {
                scan.insert((a.clone(), container.clone()));
            }
        }
        if let Some(source) = j
            .source
            .as_deref()
            .and_then(|u| crate::job::locate_source(u, &control.settings).ok())
        {
            scan.insert((source.account, source.container));
        }
    }
    for a in control.settings.destination_accounts() {
        scan.insert((a, crate::job::DEFAULT_CONTAINER.to_owned()));
    }
    let owner = owner_tag(&control.settings);
    let now = OffsetDateTime::now_utc();
    let mut report = GcReport::default();
    for (account, container) in scan {
        let listed = control
            .store
            .list_detailed(&account, &container, "", true)
            .await?;
        for b in listed {
            // Only blobs this deployment made: never another deployment's, never
            // anything without our tags.
            if b.metadata.get(META_OWNER) != Some(&owner) {
                continue;
            }
            let Some(job) = b.metadata.get(META_JOB) else {
                continue;
            };
            let path = BlobPath {
                account: account.clone(),
                container: container.clone(),
                name: b.name.clone(),
                snapshot: b.snapshot.clone(),
            };
            let in_progress = matches!(live.get(job), Some(JobState::Queued | JobState::Running));
            if protected.contains(&path) || in_progress {
                report.needed += 1;
                continue;
            }
            let old = b.last_modified.is_some_and(|t| now - t >= min_age);
            if !old {
                report.young.push(path);
                continue;
            }
            if !dry_run {
                match control.store.delete(&path).await {
                    Ok(()) => tracing::info!(blob = %path, job = %job, "garbage collected"),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            report.orphans.push(path);
        }
    }
    report.pruned_jobs = prune_jobs(control, dry_run).await?;
    Ok(report)
}

/// Deletes the documents of jobs that ended more than `gc.job_retention_days`
/// ago (none when it is 0), unless `dry_run`; returns their ids.
pub(crate) async fn prune_jobs(control: &Control, dry_run: bool) -> Result<Vec<String>, GcError> {
    let days = control.settings.gc.job_retention_days;
    if days == 0 {
        return Ok(Vec::new());
    }
    let cutoff = OffsetDateTime::now_utc() - time::Duration::days(days as i64);
    let pruned = control.state.prune(cutoff, dry_run).await?;
    if !pruned.is_empty() && !dry_run {
        tracing::info!(
            jobs = pruned.len(),
            days,
            "pruned the documents of old finished jobs"
        );
    }
    Ok(pruned)
}
