//! Which replica to copy next, and from where (pure; no I/O).
//!
//! `fanout` (default): one cross-account seed per destination account, from the
//! source snapshot or from any finished replica in another account (a tree across
//! accounts when there are many); then each account grows from its own finished
//! replicas (every finished replica is a source: doubling), so one hot source is
//! never read N times. `naive`: every replica straight from the snapshot, all at
//! once within the account caps: what hand-written scripts do.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

pub use crate::config::Strategy;

/// A blob copies can be read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSlot {
    /// Its account.
    pub account: String,
    /// Copies reading it now.
    pub reads: u32,
    /// `None` for the source snapshot, else the replica index.
    pub replica: Option<u32>,
}

/// A copy to start: replica `index` from source `source` (an index into [`Scheduler::sources`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    /// Replica index.
    pub index: u32,
    /// Source position.
    pub source: usize,
}

/// Scheduling state of one job.
#[derive(Debug, Clone)]
pub struct Scheduler {
    strategy: Strategy,
    max_reads: u32,
    sources: Vec<SourceSlot>,
    waiting: BTreeMap<String, VecDeque<u32>>,
    seeding: HashMap<String, u32>,
    /// Accounts that hold a finished replica.
    holds: HashSet<String>,
}

impl Scheduler {
    /// A scheduler for `targets` (index, account) still to copy, with `verified`
    /// replicas already in place and the snapshot in `snapshot_account`.
    pub fn new(
        strategy: Strategy,
        max_reads_per_source: u32,
        snapshot_account: &str,
        targets: impl IntoIterator<Item = (u32, String)>,
        verified: impl IntoIterator<Item = (u32, String)>,
    ) -> Self {
        let mut s = Self {
            strategy,
            max_reads: max_reads_per_source.max(1),
            sources: vec![SourceSlot {
                account: snapshot_account.to_owned(),
                reads: 0,
                replica: None,
            }],
            waiting: BTreeMap::new(),
            seeding: HashMap::new(),
            holds: HashSet::new(),
        };
        for (index, account) in targets {
            s.waiting.entry(account).or_default().push_back(index);
        }
        for (index, account) in verified {
            s.add_source(index, &account);
        }
        s
    }

    /// Every source so far (0 is the snapshot).
    pub fn sources(&self) -> &[SourceSlot] {
        &self.sources
    }

    /// Accounts with replicas still waiting, in name order.
    pub fn waiting_accounts(&self) -> Vec<String> {
        self.waiting
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// Nothing left to start.
    pub fn is_drained(&self) -> bool {
        self.waiting.values().all(VecDeque::is_empty)
    }

    /// Whether every account with waiting replicas holds a finished one (or the snapshot).
    pub fn seeded(&self) -> bool {
        self.waiting_accounts()
            .iter()
            .all(|a| self.holds.contains(a))
    }

    fn add_source(&mut self, index: u32, account: &str) {
        self.sources.push(SourceSlot {
            account: account.to_owned(),
            reads: 0,
            replica: Some(index),
        });
        self.holds.insert(account.to_owned());
    }

    fn least_read(&self, ok: impl Fn(&SourceSlot) -> bool, cap: Option<u32>) -> Option<usize> {
        self.sources
            .iter()
            .enumerate()
            .filter(|(_, s)| ok(s) && cap.is_none_or(|c| s.reads < c))
            .min_by_key(|(i, s)| (s.reads, *i))
            .map(|(i, _)| i)
    }

    /// The next copy into `account`, if one may start now.
    pub fn next_for(&mut self, account: &str) -> Option<Pick> {
        if self.waiting.get(account).is_none_or(VecDeque::is_empty) {
            return None;
        }
        let source = match self.strategy {
            Strategy::Naive => Some(0),
            Strategy::Fanout => {
                let same = self.least_read(|s| s.account == account, Some(self.max_reads));
                match same {
                    Some(i) => Some(i),
                    None => {
                        let holds =
                            self.holds.contains(account) || self.sources[0].account == account;
                        let seeding = self.seeding.get(account).copied().unwrap_or(0) > 0;
                        if holds || seeding {
                            None // wait for a source inside the account
                        } else {
                            let i =
                                self.least_read(|s| s.account != account, Some(self.max_reads))?;
                            *self.seeding.entry(account.to_owned()).or_default() += 1;
                            Some(i)
                        }
                    }
                }
            }
        }?;
        let index = self.waiting.get_mut(account)?.pop_front()?;
        self.sources[source].reads += 1;
        Some(Pick { index, source })
    }

    /// A copy ended; on success its replica becomes a source.
    pub fn finished(&mut self, pick: Pick, account: &str, ok: bool) {
        let src = &mut self.sources[pick.source];
        src.reads = src.reads.saturating_sub(1);
        if src.account != account {
            if let Some(n) = self.seeding.get_mut(account) {
                *n = n.saturating_sub(1);
            }
        }
        if ok {
            self.add_source(pick.index, account);
        }
    }

    /// Puts a replica back to be tried again (first in line).
    pub fn requeue(&mut self, index: u32, account: &str) {
        self.waiting
            .entry(account.to_owned())
            .or_default()
            .push_front(index);
    }

    /// Drops every waiting replica (the job is stopping).
    pub fn clear(&mut self) {
        self.waiting.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::Strategy;
    use super::*;
    use proptest::prelude::*;

    fn targets(per: &[(&str, u32)]) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        let mut i = 0;
        for (a, n) in per {
            for _ in 0..*n {
                out.push((i, a.to_string()));
                i += 1;
            }
        }
        out
    }

    #[test]
    fn fanout_seeds_once_per_account_then_grows_inside() {
        let mut s = Scheduler::new(
            Strategy::Fanout,
            1,
            "src",
            targets(&[("a", 3), ("b", 2)]),
            [],
        );
        let first = s.next_for("a").unwrap();
        assert_eq!(first.source, 0, "the seed reads the snapshot");
        assert_eq!(s.next_for("a"), None, "a waits for its seed");
        assert_eq!(
            s.next_for("b"),
            None,
            "the snapshot is busy (one read at a time)"
        );
        s.finished(first, "a", true);
        assert_eq!(s.sources().len(), 2);
        let b_seed = s.next_for("b").unwrap();
        assert_eq!(
            b_seed.source, 0,
            "least-read cross-account source: the idle snapshot"
        );
        let a_grow = s.next_for("a").unwrap();
        assert_eq!(
            s.sources()[a_grow.source].account,
            "a",
            "growth is same-account"
        );
        assert_eq!(s.next_for("a"), None, "one read per source");
        s.finished(a_grow, "a", true);
        let a_more = s.next_for("a").unwrap();
        assert_eq!(s.sources()[a_more.source].account, "a");
        assert!(s.is_drained() || !s.waiting_accounts().contains(&"a".to_string()));
    }

    #[test]
    fn fanout_trees_across_accounts_from_finished_replicas() {
        let mut s = Scheduler::new(
            Strategy::Fanout,
            1,
            "src",
            targets(&[("a", 2), ("b", 1), ("c", 1)]),
            [],
        );
        let a = s.next_for("a").unwrap();
        s.finished(a, "a", true);
        let b = s.next_for("b").unwrap();
        let c = s.next_for("c").unwrap();
        assert_ne!(b.source, c.source, "two seeds read two different blobs");
        assert!(
            [b.source, c.source].contains(&1),
            "a's replica seeds another account"
        );
    }

    #[test]
    fn naive_reads_the_snapshot_for_everything() {
        let mut s = Scheduler::new(
            Strategy::Naive,
            1,
            "src",
            targets(&[("a", 3)]),
            [(9, "a".into())],
        );
        for _ in 0..3 {
            assert_eq!(s.next_for("a").unwrap().source, 0);
        }
        assert!(s.is_drained());
        assert_eq!(s.sources()[0].reads, 3);
    }

    #[test]
    fn a_failed_seed_is_retried_and_frees_its_source() {
        let mut s = Scheduler::new(Strategy::Fanout, 1, "src", targets(&[("a", 2)]), []);
        let seed = s.next_for("a").unwrap();
        s.finished(seed, "a", false);
        s.requeue(seed.index, "a");
        let again = s.next_for("a").unwrap();
        assert_eq!((again.index, again.source), (seed.index, 0));
    }

    #[test]
    fn a_source_in_the_destination_account_counts_as_inside() {
        let mut s = Scheduler::new(Strategy::Fanout, 2, "a", targets(&[("a", 3)]), []);
        let x = s.next_for("a").unwrap();
        let y = s.next_for("a").unwrap();
        assert_eq!((x.source, y.source), (0, 0));
        assert_eq!(s.next_for("a"), None);
    }

    #[test]
    fn an_account_being_seeded_or_holding_a_busy_replica_waits_inside() {
        // The snapshot could serve two reads, but b's second replica waits for
        // b's seed rather than read across accounts again.
        let mut s = Scheduler::new(Strategy::Fanout, 2, "src", targets(&[("b", 2)]), []);
        assert!(!s.seeded() && !s.is_drained());
        let seed = s.next_for("b").unwrap();
        assert_eq!(s.next_for("b"), None, "one seed per account at a time");
        s.finished(seed, "b", true);
        assert!(s.seeded(), "b holds a replica");
        let grow = s.next_for("b").unwrap();
        assert_eq!(s.sources()[grow.source].account, "b");
        assert!(s.is_drained());
        // An account that holds a replica, busy at its read cap, waits for it
        // rather than read the snapshot in another account.
        let mut s = Scheduler::new(
            Strategy::Fanout,
            1,
            "src",
            targets(&[("c", 3)]),
            [(7, "c".to_owned())],
        );
        assert!(s.seeded());
        let grow = s.next_for("c").unwrap();
        assert_eq!(s.sources()[grow.source].replica, Some(7));
        assert_eq!(s.next_for("c"), None, "the snapshot is not read for c");
        assert_eq!(s.sources()[0].reads, 0);
    }

    #[test]
    fn clearing_drops_every_waiting_replica() {
        let mut s = Scheduler::new(
            Strategy::Naive,
            4,
            "src",
            targets(&[("a", 2), ("b", 2)]),
            [],
        );
        assert_eq!(s.waiting_accounts(), ["a", "b"]);
        s.clear();
        assert!(s.is_drained());
        assert!(s.waiting_accounts().is_empty());
        assert_eq!(s.next_for("a"), None);
    }

    proptest! {
        /// Driving the scheduler to the end with random successes and failures
        /// starts every replica, never exceeds the read cap, and ends drained.
        #[test]
        fn every_replica_is_eventually_copied(
            per in proptest::collection::vec(1u32..12, 1..6),
            fanout in any::<bool>(),
            cap in 1u32..4,
            failures in proptest::collection::vec(any::<bool>(), 64),
        ) {
            let names: Vec<String> = (0..per.len()).map(|i| format!("acct{i}")).collect();
            let spec: Vec<(&str, u32)> = names.iter().map(String::as_str).zip(per.iter().copied()).collect();
            let all = targets(&spec);
            let strategy = if fanout { Strategy::Fanout } else { Strategy::Naive };
            let mut s = Scheduler::new(strategy, cap, "src", all.clone(), []);
            let mut done = std::collections::BTreeSet::new();
            let mut fail = failures.into_iter().cycle();
            for _ in 0..10_000 {
                let mut running = Vec::new();
                for a in s.waiting_accounts() {
                    while let Some(p) = s.next_for(&a) {
                        running.push((p, a.clone()));
                    }
                }
                if fanout {
                    prop_assert!(s.sources().iter().all(|x| x.reads <= cap));
                }
                if running.is_empty() {
                    break;
                }
                for (p, a) in running {
                    let ok = !fail.next().unwrap() || done.len() % 3 == 0;
                    s.finished(p, &a, ok);
                    if ok {
                        prop_assert!(done.insert(p.index), "replica copied twice");
                    } else {
                        s.requeue(p.index, &a);
                    }
                }
            }
            prop_assert!(s.is_drained());
            prop_assert_eq!(done.len(), all.len());
        }
    }
}
