//! Which replica to copy next, and from where (pure; no I/O).
//!
//! `fanout` (default): one cross-account seed per destination account, from the
//! source snapshot or from any finished replica in another account (a tree across
//! accounts when there are many); then each account grows from its own finished
//! replicas (every finished replica is a source: doubling), so one hot source is
//! never read N times. `naive`: every replica straight from the snapshot, all at
//! once within the account caps: what hand-written scripts do.
//!
//! Relays (fan-out only): when accounts wait for a seed and every blob that could
//! seed them is busy, short-lived copies of a finished blob are made inside an
//! account that holds one (the snapshot's account first), each then read for
//! cross-account seeds like any other source, so every account can be seeded at
//! once from distinct blobs. A copy inside one account does not read its source
//! across the network, so a relay copy does not take a read of its source.

use crate::config::Strategy;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// A blob copies can be read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SourceSlot {
    /// Its account.
    pub account: String,
    /// Copies reading it now.
    pub reads: u32,
    /// `None` for the source snapshot or a relay, else the replica index.
    pub replica: Option<u32>,
    /// The relay's number, for a relay.
    pub relay: Option<u32>,
    /// The blob is gone (deleted under the job): never picked again.
    pub gone: bool,
}

/// A relay to make: relay `relay` in `account`, copied from source `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RelayPick {
    /// Relay number (from 0 within the job run).
    pub relay: u32,
    /// Its account.
    pub account: String,
    /// Source position (a finished blob in the same account).
    pub source: usize,
}

/// How many relays may exist in which accounts.
#[derive(Debug, Clone, Default)]
struct Relays {
    /// Relays may still be made in these accounts, this many more (room left
    /// under `max_replicas`; `None` without a limit).
    room: BTreeMap<String, Option<u32>>,
    /// Relays being made.
    pending: u32,
    /// Relays made or being made.
    made: u32,
    /// Relay copies that failed; after [`MAX_RELAY_FAILURES`] no more are tried.
    failures: u32,
}

/// Relay copies that may fail before a job stops making relays.
const MAX_RELAY_FAILURES: u32 = 3;

/// A copy to start: replica `index` from source `source` (an index into [`Scheduler::sources`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pick {
    /// Replica index.
    pub index: u32,
    /// Source position.
    pub source: usize,
}

/// Scheduling state of one job.
#[derive(Debug, Clone)]
pub(crate) struct Scheduler {
    strategy: Strategy,
    max_reads: u32,
    sources: Vec<SourceSlot>,
    waiting: BTreeMap<String, VecDeque<u32>>,
    seeding: HashMap<String, u32>,
    /// Accounts that hold a finished replica.
    holds: HashSet<String>,
    /// Relays, when enabled.
    relays: Option<Relays>,
}

impl Scheduler {
    /// A scheduler for `targets` (index, account) still to copy, with `verified`
    /// replicas already in place and the snapshot in `snapshot_account`.
    pub(crate) fn new(
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
                relay: None,
                gone: false,
            }],
            waiting: BTreeMap::new(),
            seeding: HashMap::new(),
            holds: HashSet::new(),
            relays: None,
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
    pub(crate) fn sources(&self) -> &[SourceSlot] {
        &self.sources
    }

    /// Accounts with replicas still waiting, in name order.
    pub(crate) fn waiting_accounts(&self) -> Vec<String> {
        self.waiting
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// Nothing left to start.
    pub(crate) fn is_drained(&self) -> bool {
        self.waiting.values().all(VecDeque::is_empty)
    }

    /// Whether every account with waiting replicas holds a finished one (or the snapshot).
    pub(crate) fn seeded(&self) -> bool {
        self.waiting_accounts()
            .iter()
            .all(|a| self.holds.contains(a))
    }

    fn add_source(&mut self, index: u32, account: &str) {
        self.sources.push(SourceSlot {
            account: account.to_owned(),
            reads: 0,
            replica: Some(index),
            relay: None,
            gone: false,
        });
        self.holds.insert(account.to_owned());
    }

    fn least_read(&self, ok: impl Fn(&SourceSlot) -> bool, cap: Option<u32>) -> Option<usize> {
        self.sources
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.gone && ok(s) && cap.is_none_or(|c| s.reads < c))
            .min_by_key(|(i, s)| (s.reads, *i))
            .map(|(i, _)| i)
    }

    /// The next copy into `account`, if one may start now.
    pub(crate) fn next_for(&mut self, account: &str) -> Option<Pick> {
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
    pub(crate) fn finished(&mut self, pick: Pick, account: &str, ok: bool) {
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
    pub(crate) fn requeue(&mut self, index: u32, account: &str) {
        self.waiting
            .entry(account.to_owned())
            .or_default()
            .push_front(index);
    }

    /// Source `i` is gone (a relay deleted under the job): no copy reads it
    /// again. The snapshot is never dropped (its loss fails the job).
    pub(crate) fn source_lost(&mut self, i: usize) {
        if i > 0 {
            if let Some(s) = self.sources.get_mut(i) {
                s.gone = true;
            }
        }
    }

    /// Drops every waiting replica (the job is stopping).
    pub(crate) fn clear(&mut self) {
        self.waiting.clear();
    }

    /// Lets the job make relays (fan-out only) in the accounts of `room`, as
    /// many as each names (`None`: no limit).
    pub(crate) fn enable_relays(&mut self, room: impl IntoIterator<Item = (String, Option<u32>)>) {
        if self.strategy == Strategy::Fanout {
            self.relays = Some(Relays {
                room: room.into_iter().collect(),
                ..Relays::default()
            });
        }
    }

    /// Accounts waiting for their first cross-account seed, with nothing
    /// inside them to copy from and no seed on the way.
    fn unseeded(&self) -> usize {
        self.waiting
            .iter()
            .filter(|(a, q)| {
                !q.is_empty()
                    && !self.holds.contains(*a)
                    && self.sources[0].account != **a
                    && self.seeding.get(*a).copied().unwrap_or(0) == 0
            })
            .count()
    }

    /// The next relay to make, if accounts wait for a seed that no blob is
    /// free to give and a relay may be made. Call after [`Self::next_for`] has
    /// handed out every seed it could.
    pub(crate) fn next_relay(&mut self, may_copy_in: impl Fn(&str) -> bool) -> Option<RelayPick> {
        let unseeded = self.unseeded() as u32;
        let r = self.relays.as_ref()?;
        if r.failures >= MAX_RELAY_FAILURES || unseeded <= r.pending {
            return None;
        }
        // Where: an account with room that holds a finished blob, the one with
        // the fewest relays so far (the snapshot's account wins ties).
        let made_in = |a: &str| {
            self.sources
                .iter()
                .filter(|s| s.relay.is_some() && s.account == a)
                .count()
        };
        let (account, source) = r
            .room
            .iter()
            .filter(|(a, room)| room.is_none_or(|n| n > 0) && may_copy_in(a))
            .filter_map(|(a, _)| {
                let i = self
                    .sources
                    .iter()
                    .position(|s| !s.gone && &s.account == a)?;
                Some((a.clone(), i))
            })
            .min_by_key(|(a, _)| (made_in(a), *a != self.sources[0].account))?;
        let r = self.relays.as_mut()?;
        if let Some(Some(n)) = r.room.get_mut(&account) {
            *n -= 1;
        }
        r.pending += 1;
        r.made += 1;
        Some(RelayPick {
            relay: r.made - 1,
            account,
            source,
        })
    }

    /// A relay asked for was not made after all (no copy slot, the job
    /// stopping): its room is given back, and it does not count as a failure.
    pub(crate) fn relay_unmade(&mut self, pick: &RelayPick) {
        let Some(r) = self.relays.as_mut() else {
            return;
        };
        r.pending = r.pending.saturating_sub(1);
        if let Some(Some(n)) = r.room.get_mut(&pick.account) {
            *n += 1;
        }
    }

    /// A relay copy ended; made, it is a source for cross-account seeds.
    pub(crate) fn relay_finished(&mut self, pick: &RelayPick, ok: bool) {
        let Some(r) = self.relays.as_mut() else {
            return;
        };
        r.pending = r.pending.saturating_sub(1);
        if ok {
            self.sources.push(SourceSlot {
                account: pick.account.clone(),
                reads: 0,
                replica: None,
                relay: Some(pick.relay),
                gone: false,
            });
        } else {
            r.failures += 1;
            if let Some(Some(n)) = r.room.get_mut(&pick.account) {
                *n += 1;
            }
        }
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

    #[test]
    fn relays_seed_every_account_at_once_from_distinct_blobs() {
        let mut s = Scheduler::new(
            Strategy::Fanout,
            1,
            "src",
            targets(&[("a", 2), ("b", 1), ("c", 1)]),
            [],
        );
        s.enable_relays([("src".to_owned(), None), ("a".to_owned(), Some(0))]);
        let a = s.next_for("a").unwrap();
        assert_eq!(a.source, 0, "the first seed reads the snapshot");
        assert_eq!(s.next_for("b"), None, "the snapshot is busy");
        assert_eq!(s.next_for("c"), None);
        let free = |_: &str| true;
        let r1 = s.next_relay(free).unwrap();
        let r2 = s.next_relay(free).unwrap();
        assert_eq!(s.next_relay(free), None, "one relay per waiting account");
        assert_eq!((r1.account.as_str(), r1.source), ("src", 0));
        assert_ne!(r1.relay, r2.relay);
        assert_eq!(s.sources()[0].reads, 1, "a relay copy takes no read");
        s.relay_finished(&r1, true);
        s.relay_finished(&r2, true);
        let b = s.next_for("b").unwrap();
        let c = s.next_for("c").unwrap();
        let (sb, sc) = (&s.sources()[b.source], &s.sources()[c.source]);
        assert!(sb.relay.is_some() && sc.relay.is_some() && sb.relay != sc.relay);
        assert_eq!(s.next_relay(free), None, "every account is being seeded");
    }

    /// A source that vanished (a relay deleted under the job) is never picked
    /// again; the snapshot is never dropped.
    #[test]
    fn a_lost_source_is_never_picked_again() {
        let mut s = Scheduler::new(
            Strategy::Fanout,
            1,
            "src",
            [(1, "a".to_owned()), (2, "b".to_owned())],
            [(0, "c".to_owned())],
        );
        s.source_lost(0);
        assert!(!s.sources()[0].gone, "the snapshot stays");
        s.source_lost(1);
        assert!(s.sources()[1].gone);
        let p = s.next_for("a").unwrap();
        assert_eq!(p.source, 0, "only the snapshot is left to read");
        assert_eq!(s.next_for("b"), None, "the snapshot's one read is taken");
    }

    #[test]
    fn relays_respect_room_gates_and_give_up_after_failures() {
        let mut s = Scheduler::new(
            Strategy::Fanout,
            1,
            "src",
            targets(&[("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1)]),
            [],
        );
        s.enable_relays([("src".to_owned(), Some(1))]);
        s.next_for("a").unwrap();
        assert_eq!(s.next_relay(|_| false), None, "no free copy slot");
        let r = s.next_relay(|_| true).unwrap();
        assert_eq!(s.next_relay(|_| true), None, "room for one relay only");
        s.relay_unmade(&r);
        let r = s
            .next_relay(|_| true)
            .expect("an unmade relay gives its room back");
        s.relay_finished(&r, false);
        for _ in 0..2 {
            let r = s
                .next_relay(|_| true)
                .expect("a failed relay frees its room");
            s.relay_finished(&r, false);
        }
        assert_eq!(
            s.next_relay(|_| true),
            None,
            "three failures: no more relays"
        );
        // Without relays enabled, or with naive, none are asked for.
        let mut n = Scheduler::new(Strategy::Naive, 1, "src", targets(&[("a", 2)]), []);
        n.enable_relays([("src".to_owned(), None)]);
        assert_eq!(n.next_relay(|_| true), None);
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
