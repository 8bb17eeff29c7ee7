//! Durable job state: one JSON document per job in the control account's state
//! container, written under ETag conditions so concurrent writers never lose an
//! update silently.

mod document;
mod pools;
mod store;
mod stored;
mod summary;

pub use document::*;
pub use pools::*;
pub use store::*;
pub use summary::JobSummary;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobId, JobSpec};
    use crate::storage::{BlobPath, BlobStore, Condition};
    use crate::testkit::sim::{SimConfig, SimStore};
    use bytes::Bytes;
    use std::{sync::Arc, time::Duration};
    use time::OffsetDateTime;

    fn spec() -> JobSpec {
        crate::job::parse_job_json(
            r#"{"source":"http://x/c/b.vhd","pool":{"id":"p","os":"linux","nodes":3}}"#,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn create_is_idempotent_and_saves_are_fenced() {
        let s = StateStore::new(
            Arc::new(SimStore::new(SimConfig::instant())),
            "ops",
            "state",
        );
        s.ensure().await.unwrap();
        let id = JobId::parse("j1").unwrap();
        let doc = JobDocument::replicate(id.clone(), spec());
        let etag = s.create(&doc).await.unwrap();
        assert!(matches!(s.create(&doc).await, Err(StateError::Exists(_))));

        let (mut a, _) = s.load("j1").await.unwrap().unwrap();
        let mut b = a.clone();
        a.state = JobState::Running;
        let new_etag = s.save(&mut a, &etag).await.unwrap();
        b.cancel_requested = true;
        assert!(matches!(
            s.save(&mut b, &etag).await,
            Err(StateError::Conflict(_))
        ));

        let d = s
            .update("j1", |d| {
                d.cancel_requested = true;
                true
            })
            .await
            .unwrap();
        assert!(d.cancel_requested);
        assert_eq!(d.state, JobState::Running);
        assert!(matches!(
            s.save(&mut a, &new_etag).await,
            Err(StateError::Conflict(_))
        ));
        assert!(s.load("nope").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn list_is_newest_first() {
        let s = StateStore::new(
            Arc::new(SimStore::new(SimConfig::instant())),
            "ops",
            "state",
        );
        s.ensure().await.unwrap();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            let mut d = JobDocument::replicate(JobId::parse(id).unwrap(), spec());
            d.created_at += time::Duration::seconds(i as i64);
            s.create(&d).await.unwrap();
        }
        let ids: Vec<_> = s
            .list()
            .await
            .unwrap()
            .jobs
            .into_iter()
            .map(|d| d.job_id)
            .collect();
        assert_eq!(ids, vec!["c", "b", "a"]);
    }

    /// The list reads summaries from one listing, not the documents; a corrupt
    /// document is skipped and reported; a document written before summaries
    /// existed is read; pruning removes only old finished jobs.
    #[tokio::test]
    async fn listing_reads_summaries_and_skips_what_it_cannot_read() {
        let sim = Arc::new(SimStore::new(SimConfig::instant()));
        let s = StateStore::new(sim.clone(), "ops", "state");
        s.ensure().await.unwrap();
        for i in 0..50 {
            let mut d = JobDocument::replicate(JobId::parse(&format!("j{i}")).unwrap(), spec());
            d.created_at += time::Duration::seconds(i);
            if i % 2 == 0 {
                d.state = JobState::Failed;
                d.error = Some("ö".repeat(500));
            }
            s.create(&d).await.unwrap();
        }
        sim.put_block_blob(
            &BlobPath::new("ops", "state", "jobs/broken.json"),
            Bytes::from_static(b"{ not a job"),
            &Default::default(),
            Condition::Always,
        )
        .await
        .unwrap();
        let old = serde_json::to_vec(&JobDocument::replicate(
            JobId::parse("old").unwrap(),
            spec(),
        ))
        .unwrap();
        sim.put_block_blob(
            &BlobPath::new("ops", "state", "jobs/old.json"),
            Bytes::from(old),
            &Default::default(),
            Condition::Always,
        )
        .await
        .unwrap();

        let before = sim.stats().requests;
        let listing = s.list().await.unwrap();
        let requests = sim.stats().requests - before;
        assert_eq!(listing.jobs.len(), 51);
        assert_eq!(
            requests, 3,
            "one listing, then the two documents without a summary"
        );
        assert_eq!(listing.skipped.len(), 1);
        assert_eq!(listing.skipped[0].name, "broken");
        let failed = listing.jobs.iter().find(|j| j.job_id == "j48").unwrap();
        assert_eq!(failed.state, JobState::Failed);
        assert_eq!(
            failed.error.as_deref().map(|e| e.chars().count()),
            Some(300)
        );
        assert!(failed.error.as_deref().unwrap().starts_with("öö"));
        assert_eq!(failed.pool_id, "p");

        let pruned = s
            .prune(
                OffsetDateTime::now_utc() + time::Duration::minutes(5),
                false,
            )
            .await
            .unwrap();
        assert_eq!(pruned.len(), 25, "the finished ones");
        let left = s.list().await.unwrap();
        assert!(left.jobs.iter().all(|j| !j.state.is_terminal()));
        assert_eq!(left.jobs.len(), 26);
        let kept = s
            .prune(OffsetDateTime::now_utc() - time::Duration::days(1), false)
            .await
            .unwrap();
        assert!(kept.is_empty(), "younger than the cutoff");
    }

    /// One holder of a lease at a time: another is refused while it lasts,
    /// the holder renews it, and once it runs out another takes it; two
    /// takers of a free lease at once get one.
    #[tokio::test(start_paused = true)]
    async fn a_lease_has_one_holder_until_it_runs_out() {
        let s = StateStore::new(
            Arc::new(SimStore::new(SimConfig::instant())),
            "ops",
            "state",
        );
        s.ensure().await.unwrap();
        let ttl = Duration::from_secs(30);
        let (a, b) = tokio::join!(s.lease("w", "a", ttl), s.lease("w", "b", ttl));
        assert!(a.unwrap() ^ b.unwrap(), "one of two takers at once");
        let (holder, other) = if s.lease("w", "a", ttl).await.unwrap() {
            ("a", "b")
        } else {
            ("b", "a")
        };
        assert!(!s.lease("w", other, ttl).await.unwrap());
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(s.lease("w", holder, ttl).await.unwrap(), "renewed");
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(
            !s.lease("w", other, ttl).await.unwrap(),
            "the renewal holds"
        );
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(s.lease("w", other, ttl).await.unwrap(), "run out: taken");
        assert!(!s.lease("w", holder, ttl).await.unwrap());
    }

    /// An update against a missing container, or one that loses every round to
    /// other writers, ends with an error instead of trying forever.
    #[tokio::test(start_paused = true)]
    async fn updates_are_bounded() {
        use crate::testkit::sim::{SimFault, SimFaultAction};
        let sim = Arc::new(SimStore::new(SimConfig::instant()));
        let s = StateStore::new(sim.clone(), "ops", "state");
        let bounded = Duration::from_secs(600);
        let run = RunRef {
            job_id: "j1",
            run: "r1",
        };
        let r = tokio::time::timeout(bounded, s.lock_pool("p", &run, false, None))
            .await
            .expect("a missing container ends the update");
        assert!(
            matches!(r, Err(StateError::Storage(ref e)) if e.code.as_deref() == Some("ContainerNotFound")),
            "{r:?}"
        );

        s.ensure().await.unwrap();
        s.create(&JobDocument::replicate(JobId::parse("j1").unwrap(), spec()))
            .await
            .unwrap();
        assert!(matches!(
            s.lock_pool("p", &run, false, None).await.unwrap(),
            PoolClaim::Held(..)
        ));
        for target in ["jobs/j1", "pools/p"] {
            sim.inject(SimFault {
                operation: "put_blob",
                target_contains: target.into(),
                action: SimFaultAction::Fail(412, "ConditionNotMet"),
                times: 1000,
                from: Duration::ZERO,
            });
        }
        let r = tokio::time::timeout(
            bounded,
            s.update("j1", |d| {
                d.cancel_requested = true;
                true
            }),
        )
        .await
        .expect("a contended update ends");
        assert!(
            matches!(r, Err(StateError::Contended(_, MAX_UPDATE_ROUNDS))),
            "{r:?}"
        );
        let r = tokio::time::timeout(bounded, s.update_pool_held("p", &run, |r| r.sets.clear()))
            .await
            .expect("a contended pool update ends");
        assert!(
            matches!(r, Err(StateError::Contended(_, MAX_UPDATE_ROUNDS))),
            "{r:?}"
        );
    }

    /// The claim is per run: another run of the same instance is a competitor
    /// while its claim lasts; a lapsed claim, or one of an ended job, is not.
    #[test]
    fn claims_are_fenced_per_run_not_per_instance() {
        let now = OffsetDateTime::now_utc();
        let mut d = JobDocument::replicate(JobId::parse("j1").unwrap(), spec());
        d.enter(JobState::Running).unwrap();
        d.owner = Some(Owner {
            instance: "host-1".into(),
            run: Some("run-a".into()),
            until: now + time::Duration::seconds(30),
        });
        assert!(
            d.owned_by_another_run("run-b", now).is_some(),
            "same instance, other run"
        );
        assert!(
            d.owned_by_another_run("run-a", now).is_none(),
            "its own run"
        );
        assert!(d.held_by("run-a") && !d.held_by("run-b"));
        assert!(
            d.owned_by_another_run("run-b", now + time::Duration::seconds(31))
                .is_none(),
            "a lapsed claim may be taken"
        );
        // A claim written by an earlier version (no run) belongs to another run.
        d.owner.as_mut().unwrap().run = None;
        assert!(d.owned_by_another_run("run-a", now).is_some());
        d.enter(JobState::Completed).unwrap();
        assert!(d.owned_by_another_run("run-b", now).is_none());
        assert!(!d.held_by("run-a"), "an ended job is held by nobody");
    }

    /// A pool's lock belongs to one run: that run gets it again, another run of
    /// the same job (which holds the job's claim) takes it over, another job
    /// finds it busy; only the holder may change the image sets.
    #[tokio::test]
    async fn pool_locks_are_held_per_run() {
        let s = StateStore::new(
            Arc::new(SimStore::new(SimConfig::instant())),
            "ops",
            "state",
        );
        s.ensure().await.unwrap();
        let a = RunRef {
            job_id: "j1",
            run: "a",
        };
        let b = RunRef {
            job_id: "j1",
            run: "b",
        };
        let other = RunRef {
            job_id: "j2",
            run: "c",
        };
        assert!(matches!(
            s.lock_pool("p", &a, false, None).await.unwrap(),
            PoolClaim::Held(..)
        ));
        assert!(matches!(
            s.lock_pool("p", &a, false, None).await.unwrap(),
            PoolClaim::Held(..)
        ));
        assert!(
            matches!(s.lock_pool("p", &other, false, None).await.unwrap(), PoolClaim::Busy(l) if l.job_id == "j1")
        );
        s.update_pool_held("p", &a, |_| {}).await.unwrap();
        assert!(matches!(
            s.lock_pool("p", &b, false, None).await.unwrap(),
            PoolClaim::Held(..)
        ));
        assert!(
            matches!(
                s.update_pool_held("p", &a, |_| {}).await,
                Err(StateError::LockLost(_))
            ),
            "the run that lost the lock may not write the image sets"
        );
        s.unlock_pool("p", &a).await.unwrap();
        let (record, _) = s.load_pool("p").await.unwrap().unwrap();
        assert_eq!(
            record.lock.unwrap().run.as_deref(),
            Some("b"),
            "only the holder unlocks"
        );
        s.unlock_pool("p", &b).await.unwrap();
        assert!(s.load_pool("p").await.unwrap().unwrap().0.lock.is_none());
    }

    /// A job's state changes only along its life: never out of an end, never
    /// back to queued.
    #[test]
    fn only_legal_transitions() {
        use JobState::*;
        let doc = || JobDocument::replicate(JobId::parse("t").unwrap(), spec());
        for (path, ok) in [
            (vec![Running, Running, Completed], true),
            (vec![Failed], true),
            (vec![Cancelled], true),
            (vec![Running, Failed], true),
            (vec![Running, Completed, Running], false),
            (vec![Failed, Running], false),
            (vec![Running, Queued], false),
            (vec![Queued], false),
            (vec![Cancelled, Completed], false),
        ] {
            let mut d = doc();
            let r: Result<(), IllegalTransition> = path.iter().try_for_each(|s| d.enter(*s));
            assert_eq!(r.is_ok(), ok, "{path:?}: {r:?}");
        }
        let mut d = doc();
        d.enter(Running).unwrap();
        d.enter_phase(Phase::Copying).unwrap();
        d.enter(Completed).unwrap();
        assert_eq!(d.phase, None, "an ended job has no phase");
    }

    /// A replica moves only along its life: exactly these moves are allowed,
    /// every other one is refused and leaves the record as it was.
    #[test]
    fn replica_transitions_follow_the_table() {
        use ReplicaState::*;
        let all = [Pending, Copying, Verified, Failed, Cancelled];
        let legal = [
            (Pending, Copying),
            (Copying, Copying),
            (Verified, Copying),
            (Pending, Verified),
            (Copying, Verified),
            (Verified, Verified),
            (Pending, Failed),
            (Copying, Failed),
            (Pending, Cancelled),
            (Copying, Cancelled),
            (Verified, Cancelled),
        ];
        for from in all {
            for to in all {
                let mut r = ReplicaRecord {
                    index: 3,
                    account: "a".into(),
                    uri: String::new(),
                    blob: BlobPath::new("a", "c", "b"),
                    state: from,
                    copy_id: None,
                    bytes_copied: 0,
                    bytes_total: 0,
                    attempts: 0,
                    status_requests: 0,
                    error: None,
                    inherited: false,
                    method: None,
                    ranges_done: Vec::new(),
                    copied_from: None,
                };
                let ok = legal.contains(&(from, to));
                assert_eq!(r.enter(to).is_ok(), ok, "{from:?} -> {to:?}");
                assert_eq!(r.state, if ok { to } else { from });
            }
        }
    }

    /// A running job's phase only moves forward; a job that is not running has
    /// none to move; a new claim starts again at planning, with the claim's run.
    #[test]
    fn phases_only_move_forward_and_a_claim_starts_again() {
        let mut d = JobDocument::replicate(JobId::parse("t").unwrap(), spec());
        assert!(d.enter_phase(Phase::Copying).is_err(), "queued: no phase");
        let owner = |run: &str| Owner {
            instance: "i".into(),
            run: Some(run.into()),
            until: OffsetDateTime::now_utc(),
        };
        d.claim(owner("a")).unwrap();
        assert_eq!(d.phase(), Some(Phase::Planning));
        for p in [
            Phase::Seeding,
            Phase::Copying,
            Phase::Seeding,
            Phase::Publishing,
            Phase::HandingOff,
        ] {
            d.enter_phase(p).unwrap();
        }
        for back in [Phase::Planning, Phase::Copying, Phase::Publishing] {
            assert!(d.enter_phase(back).is_err(), "handing off -> {back:?}");
            assert_eq!(d.phase(), Some(Phase::HandingOff));
        }
        d.error = Some("will retry".into());
        d.claim(owner("b")).unwrap();
        assert_eq!(d.phase(), Some(Phase::Planning), "a new run plans again");
        assert_eq!(d.error, None);
        assert_eq!(d.owner().and_then(|o| o.run.as_deref()), Some("b"));
        d.renew_claim("a", OffsetDateTime::now_utc() + time::Duration::hours(1));
        let until = d.owner().unwrap().until;
        assert!(
            until < OffsetDateTime::now_utc() + time::Duration::minutes(1),
            "another run cannot renew the claim"
        );
        d.enter(JobState::Completed).unwrap();
        assert!(
            d.claim(owner("c")).is_err(),
            "an ended job is not claimed again"
        );
    }

    /// Documents written before job kinds were typed still read: a retire job
    /// (a placeholder spec with `retire_pool`) and a replication (no `kind`).
    #[test]
    fn documents_of_earlier_versions_still_read() {
        let legacy_retire = r#"{"job_id":"r1","spec":{"source":"","pool":{"id":"p","os":"windows","nodes":0}},
            "state":"completed","created_at":"2026-11-29T10:00:00Z","updated_at":"2026-11-29T10:00:00Z",
            "retire_pool":"p"}"#;
        let d: JobDocument = serde_json::from_str(legacy_retire).unwrap();
        assert_eq!(d.work, Work::Retire { pool: "p".into() });
        assert_eq!(d.state(), JobState::Completed);
        let legacy_job = r#"{"job_id":"j1","spec":{"source":"http://x/c/b.vhd","pool":{"id":"q","os":"linux","nodes":3}},
            "state":"running","created_at":"2026-11-29T10:00:00Z","updated_at":"2026-11-29T10:00:00Z"}"#;
        let d: JobDocument = serde_json::from_str(legacy_job).unwrap();
        assert_eq!(d.pool_id(), "q");
        assert!(matches!(d.work, Work::Replicate(_)));
        // New documents say their kind, and a retire job carries no spec.
        let r = JobDocument::retire(JobId::parse("r2").unwrap(), "p");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["kind"], "retire");
        assert!(v.get("spec").is_none());
        assert_eq!(serde_json::from_value::<JobDocument>(v).unwrap(), r);
        let bad = r#"{"job_id":"x","kind":"replicate","state":"queued","created_at":"2026-11-29T10:00:00Z","updated_at":"2026-11-29T10:00:00Z"}"#;
        assert!(serde_json::from_str::<JobDocument>(bad).is_err());
    }
}
