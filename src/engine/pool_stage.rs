//! The pool stage (`[pool_stage]`): after a hand-off that carries
//! `pool_create`, the job creates its pool when it is missing or resizes it to
//! the job's nodes when it boots the same image version, then follows the
//! allocation until the pool is steady (or its `resizeTimeout` passes),
//! recording `pool_stage` in the job document.
//!
//! Crash safety: the decision is written before Batch is asked, and the
//! answer (`requested`) right after. A resumed stage that finds a decision
//! without an answer asks Pool - Get first: a pool that is there on this
//! image (after a create) or already at the target (after a resize) means
//! the lost request was carried out, so it is never sent twice.

use super::run::JobRun;
use super::*;
use crate::batch::{Added, Batch, BatchPool, Resized};
use crate::config::PoolStageConfig;
use crate::handoff::PoolCreate;
use crate::state::{PoolAction, PoolStage, PoolStageState};
use serde_json::Value;

/// Longest pause between two looks at a pool.
const MAX_POLL: Duration = Duration::from_secs(15);

/// The pool stage of a run: the Batch client, the stage's settings, metrics.
pub(super) struct PoolStager<'a> {
    pub(super) batch: &'a Batch,
    pub(super) state: &'a StateStore,
    pub(super) cfg: &'a PoolStageConfig,
    pub(super) metrics: &'a Metrics,
    pub(super) settings: &'a ValidatedSettings,
}

/// What the stage found it should do.
#[derive(Debug, PartialEq)]
enum Decision {
    Create,
    Resize,
    Follow,
    Skip(String),
}

impl PoolStager<'_> {
    /// Runs the stage for a job whose hand-off was `handoff`.
    pub(super) async fn run(
        &self,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        stop: &CancellationToken,
        handoff: &HandOff,
    ) -> Result<(), Failure> {
        if job_run.pool_stage().is_some_and(|s| s.state.is_final()) {
            return Ok(());
        }
        let Some(create) = handoff.pool_create.as_ref() else {
            let why = "the hand-off carries the legacy add_pool (VHD URIs), which Batch refuses since 2026-03-31; publish to a gallery for a pool the stage can make";
            return self.skip(job_run, PoolAction::None, 0, why).await;
        };
        if job.spec.submitted_by.as_deref() == Some(crate::job::SUBMITTED_BY_WATCH) {
            let why = "submitted by background scaling: it raises image capacity only and never resizes the pool";
            return self
                .skip(
                    job_run,
                    PoolAction::None,
                    create.target_dedicated_nodes,
                    why,
                )
                .await;
        }
        let image = &create
            .virtual_machine_configuration
            .image_reference
            .virtual_machine_image_id;
        let found = self.get(&create.id).await?;
        let earlier = job_run.pool_stage().map(|s| (s.action, s.requested));
        let decision = match (earlier, &found) {
            // Batch answered the request before the crash: follow it.
            (Some((_, true)), Some(_)) => Decision::Follow,
            // A create or resize was decided and its answer is not on record:
            // the pool says whether it was carried out.
            (Some((PoolAction::Create, false)), Some(p)) if p.boots(image) => Decision::Follow,
            (Some((PoolAction::Resize, false)), Some(p))
                if p.target_dedicated == create.target_dedicated_nodes =>
            {
                Decision::Follow
            }
            _ => self.decide(create, found.as_ref()),
        };
        let target = create.target_dedicated_nodes;
        match decision {
            Decision::Skip(why) => return self.skip(job_run, PoolAction::None, target, &why).await,
            Decision::Create => {
                let body = self.body(create);
                self.write(job_run, self.record(PoolAction::Create, target, false))
                    .await?;
                tracing::info!(pool = %create.id, nodes = target, "creating the pool");
                match self.batch.add_pool(&body).await {
                    Ok(Added::Created | Added::Exists) => {}
                    // An Add whose answer was lost: the pool says.
                    Err(e) if e.outcome_unknown() => {}
                    Err(e) => return Err(JobError::Batch(e).into()),
                }
                self.write(job_run, self.record(PoolAction::Create, target, true))
                    .await?;
            }
            Decision::Resize => {
                self.write(job_run, self.record(PoolAction::Resize, target, false))
                    .await?;
                self.resize(job_run, stop, create).await?;
            }
            Decision::Follow => {
                let action = job_run.pool_stage().map_or(PoolAction::None, |s| s.action);
                self.write(job_run, self.record(action, target, true))
                    .await?;
            }
        }
        self.follow(job_run, stop, create).await
    }

    /// What to do with the pool as Batch shows it.
    fn decide(&self, create: &PoolCreate, found: Option<&BatchPool>) -> Decision {
        decide(&self.cfg.settings, create, found)
    }

    /// The Pool - Add body: `pool_create` merged over the template, so the
    /// hand-off's id, vmSize, image and node count win.
    fn body(&self, create: &PoolCreate) -> Value {
        let mut body = Value::Object(self.cfg.template.clone());
        let ours = serde_json::to_value(create).expect("pool_create serialises");
        merge(&mut body, ours);
        body
    }

    /// Asks for the resize, waiting for the pool to be steady when it is not.
    async fn resize(
        &self,
        job_run: &JobRun<'_>,
        stop: &CancellationToken,
        create: &PoolCreate,
    ) -> Result<(), Failure> {
        let target = create.target_dedicated_nodes;
        loop {
            tracing::info!(pool = %create.id, nodes = target, "resizing the pool");
            match self
                .batch
                .resize_pool(&create.id, target, &create.resize_timeout)
                .await
                .map_err(JobError::Batch)?
            {
                Resized::Accepted => break,
                Resized::Busy => {
                    tracing::info!(pool = %create.id, "the pool is resizing; asking again once it is steady");
                    self.pause(job_run, stop).await?;
                }
            }
        }
        self.write(job_run, self.record(PoolAction::Resize, target, true))
            .await
    }

    /// Follows the allocation until the pool is steady or its resizeTimeout
    /// (from when the request was answered, plus a minute) has passed.
    async fn follow(
        &self,
        job_run: &JobRun<'_>,
        stop: &CancellationToken,
        create: &PoolCreate,
    ) -> Result<(), Failure> {
        let since = job_run
            .pool_stage()
            .and_then(|s| s.requested_at)
            .unwrap_or_else(OffsetDateTime::now_utc);
        let deadline = since + time::Duration::seconds(minutes(&create.resize_timeout) * 60 + 60);
        // Written when something changed, and at least every third of the
        // lease so the claim stays renewed through a long allocation.
        let renew = Duration::from_secs(u64::from(self.settings.engine.lease_seconds) / 3);
        let mut saved = tokio::time::Instant::now();
        loop {
            let pool = self.get(&create.id).await?;
            let before = job_run.pool_stage().expect("recorded before following");
            let mut stage = before.clone();
            let Some(p) = pool else {
                stage.state = PoolStageState::Failed;
                stage.reason = Some(format!(
                    "pool {} is gone (deleted while the stage followed it)",
                    create.id
                ));
                return self.write(job_run, stage).await;
            };
            stage.current_nodes = p.current_dedicated;
            stage.errors = p.resize_errors.clone();
            if p.steady() {
                self.observe(job_run, &p).await;
                stage.state = if p.current_dedicated < stage.target_nodes
                    && !p.resize_errors.is_empty()
                {
                    tracing::warn!(pool = %create.id, current = p.current_dedicated, target = stage.target_nodes, errors = ?p.resize_errors, "the pool fell short of its target");
                    PoolStageState::Failed
                } else {
                    tracing::info!(pool = %create.id, nodes = p.current_dedicated, "the pool is steady");
                    PoolStageState::Steady
                };
                return self.write(job_run, stage).await;
            }
            stage.state = PoolStageState::Resizing;
            if OffsetDateTime::now_utc() > deadline {
                stage.state = PoolStageState::Failed;
                stage.reason = Some(format!(
                    "pool {} was not steady within its resizeTimeout {}",
                    create.id, create.resize_timeout
                ));
                return self.write(job_run, stage).await;
            }
            if stage != before || saved.elapsed() >= renew {
                self.observe(job_run, &p).await;
                self.write(job_run, stage).await?;
                saved = tokio::time::Instant::now();
            }
            self.pause(job_run, stop).await?;
        }
    }

    /// Records what Batch said of the pool for the pools page (a failure to
    /// write it is only logged: it is an observation).
    async fn observe(&self, job_run: &JobRun<'_>, p: &BatchPool) {
        let capacity = job_run
            .publication()
            .zip(self.settings.gallery.as_ref())
            .map(|(g, cfg)| g.replicas * cfg.settings.nodes_per_replica);
        crate::batch::observe(self.metrics, self.state, p, capacity).await;
    }

    async fn get(&self, id: &str) -> Result<Option<BatchPool>, Failure> {
        self.batch
            .pool(id)
            .await
            .map_err(|e| Failure::from(JobError::Batch(e)))
    }

    fn record(&self, action: PoolAction, target: u32, requested: bool) -> PoolStage {
        PoolStage {
            action,
            state: if requested {
                PoolStageState::Resizing
            } else {
                PoolStageState::Waiting
            },
            target_nodes: target,
            current_nodes: 0,
            errors: Vec::new(),
            reason: None,
            requested,
            requested_at: requested.then(OffsetDateTime::now_utc),
        }
    }

    async fn skip(
        &self,
        job_run: &JobRun<'_>,
        action: PoolAction,
        target: u32,
        why: &str,
    ) -> Result<(), Failure> {
        tracing::info!(reason = why, "the pool stage leaves the pool alone");
        let mut stage = self.record(action, target, false);
        stage.state = PoolStageState::Skipped;
        stage.reason = Some(why.to_owned());
        self.write(job_run, stage).await
    }

    /// Records `stage` (keeping the time its request was answered) and saves.
    async fn write(&self, job_run: &JobRun<'_>, mut stage: PoolStage) -> Result<(), Failure> {
        if let Some(before) = job_run.pool_stage() {
            if before.requested && stage.requested {
                stage.requested_at = before.requested_at.or(stage.requested_at);
            }
        }
        job_run.record_pool_stage(stage);
        job_run.save().await.map_err(Failure::from_state)
    }

    async fn pause(&self, job_run: &JobRun<'_>, stop: &CancellationToken) -> Result<(), Failure> {
        if job_run.cancel_requested() {
            return Err(Failure::Cancelled);
        }
        let pause = Duration::from_millis(self.settings.engine.idle_poll_ms)
            .clamp(Duration::from_millis(100), MAX_POLL);
        tokio::select! {
            _ = tokio::time::sleep(pause) => Ok(()),
            _ = stop.cancelled() => Err(Failure::Interrupted),
        }
    }
}

/// What to do with the pool as Batch shows it, under `s`.
fn decide(
    s: &crate::config::PoolStageSettings,
    create: &PoolCreate,
    found: Option<&BatchPool>,
) -> Decision {
    let image = &create
        .virtual_machine_configuration
        .image_reference
        .virtual_machine_image_id;
    match found {
        None if s.create => Decision::Create,

        None => Decision::Skip(format!(
            "pool {} does not exist and pool_stage.create is false",
            create.id
        )),
        Some(p) if !p.boots(image) => Decision::Skip(format!(
            "pool {} boots {}, not this job's image {image}: left alone (a pool's image changes only by making a new pool)",
            create.id,
            p.image_id.as_deref().unwrap_or("an image that is not a gallery version")
        )),
        Some(p) if p.auto_scale => Decision::Skip(format!(
            "pool {} scales by its autoscale formula: the stage never resizes it",
            create.id
        )),
        Some(p) if p.target_dedicated == create.target_dedicated_nodes => Decision::Follow,
        Some(_) if s.resize => Decision::Resize,
        Some(p) => Decision::Skip(format!(
            "pool {} has {} target nodes, the job {}; pool_stage.resize is false",
            create.id, p.target_dedicated, create.target_dedicated_nodes
        )),
    }
}

/// `PT<n>M` in minutes (15 when it cannot be read).
fn minutes(iso: &str) -> i64 {
    iso.strip_prefix("PT")
        .and_then(|m| m.strip_suffix('M'))
        .and_then(|m| m.parse().ok())
        .unwrap_or(15)
}

/// Merges `ours` into `base`: objects key by key, anything else replaced.
fn merge(base: &mut Value, ours: Value) {
    match (base, ours) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pool(image: &str, target: u32, auto_scale: bool) -> BatchPool {
        BatchPool {
            id: "render".into(),
            image_id: Some(image.into()),
            allocation_state: "steady".into(),
            target_dedicated: target,
            current_dedicated: target,
            auto_scale,
            resize_errors: Vec::new(),
        }
    }

    /// Create when missing, resize on the same image, follow at the target;
    /// another image, autoscale or a flag turned off leave the pool alone.
    #[test]
    fn decisions_follow_the_pool_and_the_settings() {
        let create: PoolCreate = serde_json::from_value(json!({
            "id": "render", "vmSize": "STANDARD_D2_V3", "targetDedicatedNodes": 200,
            "resizeTimeout": "PT15M",
            "virtualMachineConfiguration": {"imageReference": {"virtualMachineImageId": "/v/1"},
                "nodeAgentSKUId": "batch.node.windows amd64"}
        }))
        .unwrap();
        let on: crate::config::PoolStageSettings = serde_json::from_value(json!({
            "batch_url": "https://b", "create": true, "resize": true, "watch_seconds": 0,
            "headroom": 0.25, "ca_file": "", "template": ""
        }))
        .unwrap();
        let off = crate::config::PoolStageSettings {
            create: false,
            resize: false,
            ..on.clone()
        };
        assert_eq!(decide(&on, &create, None), Decision::Create);
        assert_eq!(
            decide(&on, &create, Some(&pool("/V/1", 100, false))),
            Decision::Resize
        );
        assert_eq!(
            decide(&on, &create, Some(&pool("/v/1", 200, false))),
            Decision::Follow
        );
        for (s, found, says) in [
            (&on, Some(pool("/v/2", 100, false)), "boots /v/2"),
            (&on, Some(pool("/v/1", 100, true)), "autoscale"),
            (&off, None, "create is false"),
            (&off, Some(pool("/v/1", 100, false)), "resize is false"),
        ] {
            match decide(s, &create, found.as_ref()) {
                Decision::Skip(why) => assert!(why.contains(says), "{why}"),
                other => panic!("{says}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_hand_off_wins_over_the_template_key_by_key() {
        let mut body = json!({
            "id": "template-id", "vmSize": "small", "taskSlotsPerNode": 4,
            "networkConfiguration": {"subnetId": "/subnets/a"},
            "virtualMachineConfiguration": {"nodeAgentSKUId": "old", "osDisk": {"caching": "readonly"},
                "imageReference": {"virtualMachineImageId": "/old"}}
        });
        merge(
            &mut body,
            json!({
                "id": "render", "vmSize": "STANDARD_D2_V3", "targetDedicatedNodes": 200,
                "virtualMachineConfiguration": {"nodeAgentSKUId": "batch.node.windows amd64",
                    "imageReference": {"virtualMachineImageId": "/new"}}
            }),
        );
        assert_eq!(body["id"], "render");
        assert_eq!(body["vmSize"], "STANDARD_D2_V3");
        assert_eq!(body["taskSlotsPerNode"], 4);
        assert_eq!(body["networkConfiguration"]["subnetId"], "/subnets/a");
        assert_eq!(
            body["virtualMachineConfiguration"]["osDisk"]["caching"],
            "readonly"
        );
        assert_eq!(
            body["virtualMachineConfiguration"]["imageReference"]["virtualMachineImageId"],
            "/new"
        );
        assert_eq!(minutes("PT45M"), 45);
        assert_eq!(minutes("P1D"), 15);
    }
}
