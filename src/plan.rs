//! Planning, with no I/O: how many replicas, which account each goes to, what
//! each is called, and the metadata that marks it as ours.

use crate::job::ValidatedJob;
use crate::placement::{place_more, CapacityError};
use crate::storage::{BlobPath, Metadata};
use std::collections::BTreeMap;

/// Metadata key: the job that made a replica.
pub const META_JOB: &str = "vhdrep_job_id";
/// Metadata key: the pool a replica is for.
pub(crate) const META_POOL: &str = "vhdrep_pool_id";
/// Metadata key: the replica's index in its job.
pub const META_REPLICA: &str = "vhdrep_replica";
/// Metadata key: the source snapshot the replica holds.
pub const META_SNAPSHOT: &str = "vhdrep_source_snapshot";
/// Metadata key: the deployment that made a blob (`<control account>/<state
/// container>`), so garbage collection never touches another deployment's blobs.
pub(crate) const META_OWNER: &str = "vhdrep_owner";
/// Metadata key: the run of the job that created a blob (replica, relay or
/// snapshot). A run's clean-up deletes only blobs that carry its own run.
pub(crate) const META_RUN: &str = "vhdrep_run";

/// The owner tag of a deployment.
pub fn owner_tag(settings: &crate::config::ValidatedSettings) -> String {
    format!(
        "{}/{}",
        settings.control.account, settings.control.state_container
    )
}

/// One replica of a job.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaPlan {
    /// 0-based index in the job.
    pub index: u32,
    /// Destination blob.
    pub blob: BlobPath,
    /// Kept from the pool's image set (already there), not copied.
    pub kept: bool,
}

/// Every replica of a job, and what of the pool's image set it no longer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Replicas in index order.
    pub replicas: Vec<ReplicaPlan>,
    /// Replicas of the pool's image set beyond what the job needs (a smaller pool).
    pub surplus: Vec<BlobPath>,
}

impl Plan {
    /// Replica count per account.
    pub fn per_account(&self) -> BTreeMap<String, u32> {
        let mut m = BTreeMap::new();
        for r in &self.replicas {
            *m.entry(r.blob.account.clone()).or_default() += 1;
        }
        m
    }
}

/// The deterministic name of replica `index` of a job, so a re-run finds its own
/// blobs: `<pool>/<job>/<source stem>-<index>.vhd`.
pub(crate) fn replica_name(pool_id: &str, job_id: &str, source_name: &str, index: u32) -> String {
    let file = source_name.rsplit('/').next().unwrap_or(source_name);
    let stem = file
        .strip_suffix(".vhd")
        .or_else(|| file.strip_suffix(".VHD"))
        .unwrap_or(file);
    format!("{pool_id}/{job_id}/{stem}-{index:04}.vhd")
}

/// The one plan of a job, which `vhd-replicator plan` prints and the job then
/// records: the replicas its pool's image set already holds (`keepable`, in the
/// set's order) keep indices 0.. up to the job's count; the rest are named
/// `replica_name` and placed over the job's accounts where fewest are, within
/// each account's `capacity`; the set's replicas beyond the count are surplus.
pub fn plan(
    job: &ValidatedJob,
    keepable: &[BlobPath],
    capacity: &BTreeMap<String, Option<u32>>,
) -> Result<Plan, CapacityError> {
    let keep = keepable.len().min(job.replicas as usize);
    let (kept, surplus) = keepable.split_at(keep);
    let mut held: BTreeMap<String, u32> = BTreeMap::new();
    for b in kept {
        *held.entry(b.account.clone()).or_default() += 1;
    }
    let places = place_more(job.replicas - keep as u32, &job.accounts, &held, capacity)?;
    let kept = kept.iter().enumerate().map(|(i, blob)| ReplicaPlan {
        index: i as u32,
        blob: blob.clone(),
        kept: true,
    });
    let new = places.into_iter().enumerate().map(|(i, account)| {
        let index = (keep + i) as u32;
        ReplicaPlan {
            index,
            blob: BlobPath::new(
                &account,
                &job.container,
                &replica_name(&job.spec.pool.id, job.id.as_str(), &job.source.name, index),
            ),
            kept: false,
        }
    });
    Ok(Plan {
        replicas: kept.chain(new).collect(),
        surplus: surplus.to_vec(),
    })
}

/// The most replicas each of a job's accounts may hold (`None`: unlimited).
pub fn capacity(
    job: &ValidatedJob,
    settings: &crate::config::ValidatedSettings,
) -> BTreeMap<String, Option<u32>> {
    job.accounts
        .iter()
        .map(|a| (a.clone(), settings.account(a).and_then(|c| c.max_replicas)))
        .collect()
}

/// Metadata that marks a replica as made by this deployment for this job.
pub(crate) fn replica_metadata(
    job: &ValidatedJob,
    index: u32,
    snapshot: &str,
    owner: &str,
) -> Metadata {
    Metadata::from([
        (META_OWNER.to_owned(), owner.to_owned()),
        (META_JOB.to_owned(), job.id.to_string()),
        (META_POOL.to_owned(), job.spec.pool.id.clone()),
        (META_REPLICA.to_owned(), index.to_string()),
        (META_SNAPSHOT.to_owned(), snapshot.to_owned()),
    ])
}

/// Whether a blob's metadata says run `run` of job `job_id` created it.
pub(crate) fn made_by_run(metadata: &Metadata, job_id: &str, run: &str) -> bool {
    metadata.get(META_JOB).map(String::as_str) == Some(job_id)
        && metadata.get(META_RUN).map(String::as_str) == Some(run)
}

/// Whether a blob's metadata says it is replica `index` of this job from this snapshot.
pub(crate) fn is_our_replica(
    metadata: &Metadata,
    job: &ValidatedJob,
    index: u32,
    snapshot: &str,
) -> bool {
    metadata.get(META_JOB).map(String::as_str) == Some(job.id.as_str())
        && metadata.get(META_REPLICA).map(String::as_str) == Some(index.to_string().as_str())
        && metadata.get(META_SNAPSHOT).map(String::as_str) == Some(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::place;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("dst{i}")).collect()
    }

    #[test]
    fn five_over_three_is_two_two_one() {
        let p = place(5, &names(3));
        assert_eq!(p, vec!["dst0", "dst1", "dst2", "dst0", "dst1"]);
    }

    #[test]
    fn top_ups_fill_the_emptiest_accounts_within_capacity() {
        let accounts = names(3);
        let held = BTreeMap::from([
            ("dst0".to_owned(), 4),
            ("dst1".to_owned(), 3),
            ("dst2".to_owned(), 3),
        ]);
        let cap = BTreeMap::from([("dst2".to_owned(), Some(4))]);
        let placed = place_more(5, &accounts, &held, &cap).unwrap();
        let mut per = BTreeMap::new();
        for a in &placed {
            *per.entry(a.as_str()).or_insert(0) += 1;
        }
        assert_eq!(per, BTreeMap::from([("dst0", 2), ("dst1", 2), ("dst2", 1)]));
        let all_capped = BTreeMap::from([
            ("dst0".to_owned(), Some(5)),
            ("dst1".to_owned(), Some(5)),
            ("dst2".to_owned(), Some(5)),
        ]);
        let e = place_more(10, &accounts, &held, &all_capped).unwrap_err();
        assert_eq!((e.capacity, e.accounts_needed), (5, 1));
        assert!(
            e.to_string().contains("add 1 more destination account"),
            "{e}"
        );
    }

    struct Keys;
    impl crate::config::SecretSource for Keys {
        fn env(&self, _: &str) -> Option<String> {
            Some("a2V5".into())
        }
        fn file(&self, _: &str) -> Result<String, String> {
            Err("none".into())
        }
    }

    fn settings() -> crate::config::ValidatedSettings {
        crate::config::Settings::from_toml(
            "[batch]\nsubscription = \"s\"\nregion = \"r\"\n[control]\naccount = \"ops\"\n\
             [[accounts]]\nname = \"ops\"\nkey_env = \"K\"\ndestination = false\n\
             [[accounts]]\nname = \"dst1\"\nkey_env = \"K\"\n[[accounts]]\nname = \"dst2\"\nkey_env = \"K\"\nmax_replicas = 3\n",
        )
        .unwrap()
        .validate(&Keys)
        .unwrap()
    }

    fn job(settings: &crate::config::ValidatedSettings, id: &str, nodes: u32) -> ValidatedJob {
        crate::job::parse_job_json(&format!(
            r#"{{"job_id":"{id}","source":"https://ops.blob.core.windows.net/i/disk.vhd","pool":{{"id":"render","os":"windows","nodes":{nodes},"vm_size":"STANDARD_D2_V3"}}}}"#
        ))
        .unwrap()
        .validate(settings)
        .unwrap()
    }

    #[test]
    fn the_owner_tag_names_the_control_account_and_state_container() {
        assert_eq!(owner_tag(&settings()), "ops/vhd-replicator-state");
    }

    #[test]
    fn a_plan_keeps_what_the_set_holds_and_places_the_rest_within_capacity() {
        let settings = settings();
        let job = job(&settings, "j2", 100); // 5 Windows replicas
        let cap = capacity(&job, &settings);
        assert_eq!(
            cap,
            BTreeMap::from([("dst1".to_owned(), None), ("dst2".to_owned(), Some(3))])
        );
        let set = [
            BlobPath::new("dst2", "c", "render/j1/disk-0000.vhd"),
            BlobPath::new("dst2", "c", "render/j1/disk-0001.vhd"),
        ];
        let p = plan(&job, &set, &cap).unwrap();
        assert_eq!(
            p.per_account(),
            BTreeMap::from([("dst1".to_owned(), 3), ("dst2".to_owned(), 2)])
        );
        let kept: Vec<_> = p.replicas.iter().filter(|r| r.kept).collect();
        assert_eq!(kept.len(), 2);
        assert_eq!((kept[0].index, &kept[0].blob), (0, &set[0]));
        let names: Vec<_> = p.replicas[2..]
            .iter()
            .map(|r| r.blob.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "render/j2/disk-0002.vhd",
                "render/j2/disk-0003.vhd",
                "render/j2/disk-0004.vhd"
            ]
        );
        assert!(p.surplus.is_empty());
        // A smaller pool keeps the first replicas of the set; the rest are surplus.
        let small = crate::job::parse_job_json(
            r#"{"job_id":"j3","source":"https://ops.blob.core.windows.net/i/disk.vhd","pool":{"id":"render","os":"windows","nodes":20,"vm_size":"STANDARD_D2_V3"}}"#,
        )
        .unwrap()
        .validate(&settings)
        .unwrap();
        let p = plan(&small, &set, &cap).unwrap();
        assert_eq!(p.replicas.len(), 1);
        assert!(p.replicas[0].kept);
        assert_eq!(p.surplus, vec![set[1].clone()]);
        assert_eq!(p.per_account(), BTreeMap::from([("dst2".to_owned(), 1)]));
    }

    #[test]
    fn our_replicas_are_known_by_job_index_and_snapshot() {
        let settings = settings();
        let job = job(&settings, "j1", 20);
        let meta = replica_metadata(&job, 3, "2026-01-01T00:00:00Z", "ops/state");
        assert_eq!(meta.get(META_OWNER).map(String::as_str), Some("ops/state"));
        assert_eq!(meta.get(META_POOL).map(String::as_str), Some("render"));
        assert!(is_our_replica(&meta, &job, 3, "2026-01-01T00:00:00Z"));
        assert!(!is_our_replica(&meta, &job, 4, "2026-01-01T00:00:00Z"));
        assert!(!is_our_replica(&meta, &job, 3, "2026-02-02T00:00:00Z"));
        assert!(!is_our_replica(
            &meta,
            &self::job(&settings, "j9", 20),
            3,
            "2026-01-01T00:00:00Z"
        ));
        for key in [META_JOB, META_REPLICA, META_SNAPSHOT] {
            let mut without = meta.clone();
            without.remove(key);
            assert!(
                !is_our_replica(&without, &job, 3, "2026-01-01T00:00:00Z"),
                "{key}"
            );
        }
        assert!(!is_our_replica(
            &Metadata::new(),
            &job,
            3,
            "2026-01-01T00:00:00Z"
        ));
    }

    #[test]
    fn placement_fills_exactly_and_names_the_accounts_missing() {
        let accounts = names(2);
        let cap = BTreeMap::from([("dst0".to_owned(), Some(5)), ("dst1".to_owned(), Some(5))]);
        let held = BTreeMap::from([("dst0".to_owned(), 3)]);
        // Room for exactly 7 more: 7 fit, 8 do not.
        assert_eq!(place_more(7, &accounts, &held, &cap).unwrap().len(), 7);
        let e = place_more(8, &accounts, &held, &cap).unwrap_err();
        assert_eq!((e.capacity, e.wanted, e.accounts_needed), (7, 8, 1));
        // 23 wanted, 7 fit: 16 more need 4 more accounts of 5.
        let e = place_more(23, &accounts, &held, &cap).unwrap_err();
        assert_eq!(e.accounts_needed, 4);
    }

    #[test]
    fn names_are_deterministic_and_readable() {
        assert_eq!(
            replica_name("render", "j1", "images/win2016-app.vhd", 7),
            "render/j1/win2016-app-0007.vhd"
        );
        assert_eq!(replica_name("p", "j", "disk", 0), "p/j/disk-0000.vhd");
    }

    proptest! {
        #[test]
        fn placement_is_balanced(count in 0u32..2000, n in 1usize..60) {
            let accounts = names(n);
            let p = place(count, &accounts);
            prop_assert_eq!(p.len(), count as usize);
            let mut per: BTreeMap<&str, u32> = BTreeMap::new();
            for a in &p { *per.entry(a.as_str()).or_default() += 1; }
            let max = per.values().copied().max().unwrap_or(0);
            let min = if per.len() < n { 0 } else { per.values().copied().min().unwrap_or(0) };
            prop_assert!(max - min <= 1);
            prop_assert!(p.iter().all(|a| accounts.contains(a)));
        }

        #[test]
        fn replica_names_are_unique(count in 1u32..500) {
            let names: std::collections::HashSet<_> = (0..count).map(|i| replica_name("p", "j", "s.vhd", i)).collect();
            prop_assert_eq!(names.len(), count as usize);
        }
    }
}
