//! Background scaling (`pool_stage.watch_seconds`): image capacity that
//! follows the pool. Every round, one instance (the holder of the `watch`
//! lease, taken under ETag like a job's claim) reads the pools this
//! deployment made, and when a pool's target dedicated nodes exceed what its
//! gallery image serves / (1 + headroom), it submits a grow job for
//! target x (1 + headroom) nodes, marked `"submitted_by": "watch"`. Such a
//! job raises the gallery replica count only; the pool stage never resizes a
//! pool for it. Nothing is submitted while another job of the pool is queued
//! or running, or while the pool is being retired.

use crate::batch::Batch;
use crate::control::Control;
use crate::job::{JobSpec, SUBMITTED_BY_WATCH};
use crate::state::{PoolRecord, StateError};
use std::{collections::HashSet, time::Duration};
use tokio_util::sync::CancellationToken;

/// The lease every watching instance competes for.
const LEASE: &str = "watch";

/// What one round found for one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seen {
    /// The image serves the target with the headroom.
    Enough,
    /// A grow job was submitted (its id).
    Grown(String),
    /// The pool needs more, but a job of the pool is queued or running, or it
    /// is being retired.
    Busy,
    /// Not a pool the stage can judge: no gallery version, not in Batch, or
    /// on another image.
    Unknown,
}

/// Runs rounds every `pool_stage.watch_seconds` until `stop`.
pub(crate) async fn run(control: Control, holder: String, stop: CancellationToken) {
    let Some(stage) = control.settings.pool_stage.clone() else {
        return;
    };
    let every = Duration::from_secs(stage.settings.watch_seconds);
    if every.is_zero() {
        return;
    }
    let batch = match Batch::new(
        &stage,
        control.settings.retry_policy(),
        control.settings.connect_timeout(),
    ) {
        Ok(b) => b,
        Err(e) => return tracing::error!(error = %e, "background scaling cannot start"),
    };
    loop {
        match round(&control, &batch, &holder, every * 3).await {
            Ok(seen) => tracing::debug!(?seen, "watch round"),
            Err(e) => tracing::warn!(error = %e, "watch round failed; trying again next round"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// One round, when this instance holds the lease: each pool judged.
pub(crate) async fn round(
    control: &Control,
    batch: &Batch,
    holder: &str,
    lease: Duration,
) -> Result<Vec<(String, Seen)>, StateError> {
    if !control.state.lease(LEASE, holder, lease).await? {
        return Ok(Vec::new());
    }
    let pools = control.state.list_pools().await?;
    // The pools with a job queued or running, read once a round and only when
    // some pool needs a grow job.
    let mut busy: Option<HashSet<String>> = None;
    let mut seen = Vec::new();
    for record in pools {
        let s = match judge(control, batch, &record).await {
            Judged::Grow(nodes) => {
                let busy = match &busy {
                    Some(b) => b,
                    None => busy.insert(pools_with_jobs(control).await?),
                };
                if busy.contains(&record.pool_id)
                    || record.lock.as_ref().is_some_and(|l| l.retiring)
                {
                    Seen::Busy
                } else {
                    grow(control, &record, nodes).await
                }
            }
            Judged::Seen(s) => s,
        };
        seen.push((record.pool_id, s));
    }
    Ok(seen)
}

/// The pools that have a job queued or running.
async fn pools_with_jobs(control: &Control) -> Result<HashSet<String>, StateError> {
    Ok(control
        .state
        .list()
        .await?
        .jobs
        .into_iter()
        .filter(|j| !j.state.is_terminal())
        .map(|j| j.pool_id)
        .collect())
}

/// What a pool needs.
enum Judged {
    /// Nothing to submit.
    Seen(Seen),
    /// A grow job for this many nodes.
    Grow(u32),
}

/// Judges one pool: what Batch says of it against what its image serves.
async fn judge(control: &Control, batch: &Batch, record: &PoolRecord) -> Judged {
    let (Some(set), Some(stage), Some(gallery)) = (
        record.sets.last(),
        control.settings.pool_stage.as_ref(),
        control.settings.gallery.as_ref(),
    ) else {
        return Judged::Seen(Seen::Unknown);
    };
    let Some(version) = &set.gallery_version else {
        return Judged::Seen(Seen::Unknown);
    };
    let pool = match batch.pool(&record.pool_id).await {
        Ok(Some(p)) if p.boots(&version.version_id) => p,
        Ok(_) => return Judged::Seen(Seen::Unknown),
        Err(e) => {
            tracing::warn!(pool = %record.pool_id, error = %e, "cannot read the pool from Batch");
            return Judged::Seen(Seen::Unknown);
        }
    };
    let capacity = version.replicas * gallery.settings.nodes_per_replica;
    crate::batch::observe(&control.metrics, &control.state, &pool, Some(capacity)).await;
    let headroom = 1.0 + stage.settings.headroom;
    if f64::from(pool.target_dedicated) <= f64::from(capacity) / headroom {
        return Judged::Seen(Seen::Enough);
    }
    Judged::Grow((f64::from(pool.target_dedicated) * headroom).ceil() as u32)
}

/// Submits the pool's grow job for `nodes` nodes.
async fn grow(control: &Control, record: &PoolRecord, nodes: u32) -> Seen {
    let Some(spec) = grow_spec(control, record, nodes).await else {
        return Seen::Unknown;
    };
    let id = spec.job_id.clone().unwrap_or_default();
    tracing::info!(pool = %record.pool_id, nodes, job = %id, "the pool outgrows its image: submitting a grow job");
    match control.submit(spec).await {
        Ok(_) => Seen::Grown(id),
        Err(e) => {
            tracing::warn!(pool = %record.pool_id, error = %e, "cannot submit the grow job");
            Seen::Unknown
        }
    }
}

/// The grow job: the spec of the job that made the pool's current set, for
/// `nodes` nodes, marked as the watch's. Its id is fixed by the pool, the
/// nodes and the set, so a round repeated (or run twice) submits it once.
async fn grow_spec(control: &Control, record: &PoolRecord, nodes: u32) -> Option<JobSpec> {
    let set = record.sets.last()?;
    let made_by = set.replicas.first().map(|r| r.job_id.as_str())?;
    let (doc, _) = control.state.load(made_by).await.ok()??;
    let mut spec = doc.spec()?.clone();
    let pool: String = record
        .pool_id
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(36)
        .collect();
    let stamp = set.created_at.unix_timestamp() % 100_000;
    spec.job_id = Some(format!("watch-{pool}-{nodes}-{stamp}"));
    spec.pool.nodes = nodes;
    spec.replicas = None;
    spec.submitted_by = Some(SUBMITTED_BY_WATCH.to_owned());
    Some(spec)
}
