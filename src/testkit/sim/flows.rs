//! The bytes in motion in the simulated store: async copies and ranged writes,
//! each a flow whose rate is its fair share of what it passes through (the
//! source blob's reads, the destination blob's writes, the accounts' egress and
//! ingress). The load on each of those is counted as flows come and go, so a
//! rate costs a few lookups however many flows there are (a benchmark keeps
//! thousands in flight).

use super::{BlobKind, BlobPath, Content, SimConfig};
use std::collections::HashMap;

/// One copy or ranged write in motion.
#[derive(Debug)]
pub(super) struct Flow {
    pub(super) id: String,
    pub(super) dest: BlobPath,
    pub(super) source: BlobPath,
    pub(super) content: Content,
    pub(super) kind: BlobKind,
    pub(super) total: f64,
    pub(super) done: f64,
    pub(super) same_account: bool,
    pub(super) fails_at: Option<f64>,
    /// A synchronous ranged write (Put Page From URL), not an async copy.
    pub(super) ranged: bool,
    /// Order of starting.
    pub(super) seq: u64,
    /// The source's written pages, given to the destination at the end.
    pub(super) written: Option<Vec<std::ops::Range<u64>>>,
}

impl Flow {
    /// Whether it passes through the shared limits (anything but an async copy
    /// inside one account).
    fn shared(&self) -> bool {
        self.ranged || !self.same_account
    }

    /// An async copy between accounts.
    fn async_cross(&self) -> bool {
        !self.ranged && !self.same_account
    }

    /// Where its progress ends (its failure point, for one that fails).
    pub(super) fn end(&self) -> f64 {
        self.fails_at.map_or(self.total, |x| x * self.total)
    }
}

/// A flow with its load keys and whether it moves now.
#[derive(Debug)]
struct Entry {
    flow: Flow,
    /// Source blob, destination blob, source account, destination account.
    keys: [usize; 4],
    /// Counted in the load (a serialized async copy waits uncounted).
    active: bool,
}

/// Every flow, and the load on each blob and account.
#[derive(Debug, Default)]
pub(super) struct Flows {
    entries: Vec<Entry>,
    ids: HashMap<String, usize>,
    readers: Vec<u32>,
    writers: Vec<u32>,
    egress: Vec<u32>,
    ingress: Vec<u32>,
}

impl Flows {
    fn key(&mut self, k: String) -> usize {
        let n = self.ids.len();
        let i = *self.ids.entry(k).or_insert(n);
        if i == n {
            for v in [
                &mut self.readers,
                &mut self.writers,
                &mut self.egress,
                &mut self.ingress,
            ] {
                v.push(0);
            }
        }
        i
    }

    fn count(&mut self, i: usize, by: i32) {
        let e = &self.entries[i];
        let [src, dst, sa, da] = e.keys;
        let ranged = e.flow.ranged;
        let add = |v: &mut u32| *v = v.saturating_add_signed(by);
        add(&mut self.readers[src]);
        add(&mut self.egress[sa]);
        add(&mut self.ingress[da]);
        if ranged {
            add(&mut self.writers[dst]);
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Flow> {
        self.entries.iter().map(|e| &e.flow)
    }

    pub(super) fn position(&self, seq: u64) -> Option<usize> {
        self.entries.iter().position(|e| e.flow.seq == seq)
    }

    pub(super) fn get(&self, i: usize) -> &Flow {
        &self.entries[i].flow
    }

    /// Moves every flow on by `step` seconds at `rates`.
    pub(super) fn move_on(&mut self, rates: &[f64], step: f64) {
        for (e, r) in self.entries.iter_mut().zip(rates) {
            e.flow.done = (e.flow.done + r * step).min(e.flow.total);
        }
    }

    /// Starts `flow`; with async copies serialized, one into an account that
    /// already has one moving waits.
    pub(super) fn push(&mut self, cfg: &SimConfig, flow: Flow) {
        let keys = [
            self.key(format!("b {}", flow.source)),
            self.key(format!("b {}", flow.dest)),
            self.key(format!("a {}", flow.source.account)),
            self.key(format!("a {}", flow.dest.account)),
        ];
        let waits = cfg.async_serial_per_account
            && flow.async_cross()
            && self
                .entries
                .iter()
                .any(|e| e.flow.async_cross() && e.flow.dest.account == flow.dest.account);
        let shared = flow.shared();
        self.entries.push(Entry {
            flow,
            keys,
            active: !waits,
        });
        if shared && !waits {
            self.count(self.entries.len() - 1, 1);
        }
    }

    /// Takes out every flow `pred` picks, in no particular order.
    pub(super) fn remove_where(
        &mut self,
        cfg: &SimConfig,
        pred: impl Fn(&Flow) -> bool,
    ) -> Vec<Flow> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.entries.len() {
            if !pred(&self.entries[i].flow) {
                i += 1;
                continue;
            }
            if self.entries[i].active && self.entries[i].flow.shared() {
                self.count(i, -1);
            }
            let e = self.entries.swap_remove(i);
            if cfg.async_serial_per_account && e.flow.async_cross() {
                self.wake_next(&e.flow.dest.account);
            }
            out.push(e.flow);
        }
        out
    }

    /// The oldest waiting async copy into `account` starts moving.
    fn wake_next(&mut self, account: &str) {
        let moving = self
            .entries
            .iter()
            .any(|e| e.active && e.flow.async_cross() && e.flow.dest.account == account);
        if moving {
            return;
        }
        let next = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.active && e.flow.dest.account == account)
            .min_by_key(|(_, e)| e.flow.seq)
            .map(|(i, _)| i);
        if let Some(i) = next {
            self.entries[i].active = true;
            self.count(i, 1);
        }
    }

    /// The rate of flow `i`: an async copy inside one account at its own rate;
    /// anything else at the smallest of its fair shares of blob read, egress and
    /// ingress bandwidth, a ranged write also of the destination blob's write
    /// bandwidth, an async copy also at most its best-effort rate (and a waiting
    /// one not at all).
    pub(super) fn rate(&self, cfg: &SimConfig, i: usize) -> f64 {
        let e = &self.entries[i];
        if !e.flow.shared() {
            return cfg.same_account_bps;
        }
        if !e.active {
            return 0.0;
        }
        let [src, dst, sa, da] = e.keys;
        let share = |bps: f64, n: u32| bps / f64::from(n.max(1));
        let r = share(cfg.account_egress_bps, self.egress[sa])
            .min(share(cfg.account_ingress_bps, self.ingress[da]))
            .min(share(cfg.blob_read_bps, self.readers[src]));
        if e.flow.ranged {
            r.min(share(cfg.blob_write_bps, self.writers[dst]))
        } else {
            r.min(cfg.async_cross_account_bps)
        }
    }

    /// The rate of every flow, in order.
    pub(super) fn rates(&self, cfg: &SimConfig) -> Vec<f64> {
        (0..self.entries.len()).map(|i| self.rate(cfg, i)).collect()
    }
}
