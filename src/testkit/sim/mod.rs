//! A simulated Azure Blob Storage for scale tests and benchmarks, on tokio's clock
//! (run it with time paused and a day of copying takes seconds).
//!
//! The model, deterministic for a seed:
//! - async copies stay pending with advancing progress and finish when their bytes
//!   have flowed;
//! - a cross-account copy moves at the smallest of its shares of the source blob's
//!   read bandwidth (60 MiB/s by default, shared by every copy reading that blob),
//!   the source account's egress and the destination account's ingress;
//! - an async cross-account copy also runs at most at a best-effort rate (users
//!   report 35-45 MB/s), and optionally one at a time per destination account;
//! - a ranged write (Put Page From URL) is synchronous: it returns when its bytes
//!   have flowed at the smallest of its shares of the source blob's read
//!   bandwidth, the destination blob's write bandwidth (60 MiB/s) and the
//!   accounts' egress and ingress; one blob answers at most
//!   `blob_requests_per_second` writes per second and 503 ServerBusy beyond;
//! - a copy inside one account is fast (its own rate, no shared limit);
//! - each account answers at most `requests_per_second` requests per second and
//!   503 ServerBusy beyond (with Retry-After when configured);
//! - a seeded share of requests fails with 500 OperationTimedOut, and a share of
//!   cross-account copies ends `failed`;
//! - blobs may be virtual: a length and a real 512-byte tail (the VHD footer), so a
//!   127 GiB VHD costs nothing.

use crate::azure::{ErrorClass, ServiceError};
use crate::storage::{
    AccountInfo, BlobKind, BlobPath, BlobProperties, BlobStore, Condition, CopyInfo, CopyStarted,
    CopyState, Metadata, SourceRead, StorageResult,
};
use async_trait::async_trait;
use bytes::Bytes;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Mutex,
    time::Duration,
};
use time::OffsetDateTime;
use tokio::time::Instant;
use url::Url;

mod flows;
use flows::{Flow, Flows};

/// The simulated service's domain: an account's endpoint is
/// `http://{account}.blob.sim.invalid`, virtual-host style as on Azure.
pub(crate) const DOMAIN: &str = "blob.sim.invalid";
const MIB: f64 = 1024.0 * 1024.0;

/// Parameters of the model.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Read bandwidth of one blob, bytes per second (Azure: about 60 MiB/s).
    pub blob_read_bps: f64,
    /// Ingress of one account, bytes per second (25 Gbps).
    pub account_ingress_bps: f64,
    /// Egress of one account, bytes per second (50 Gbps).
    pub account_egress_bps: f64,
    /// Rate of one copy inside an account, bytes per second.
    pub same_account_bps: f64,
    /// Write bandwidth of one page blob, bytes per second (Azure: a 60 MiB/s target).
    pub blob_write_bps: f64,
    /// Writes one blob answers per second before 503 ServerBusy (Azure: 500).
    pub blob_requests_per_second: u32,
    /// Best-effort rate of one async copy between accounts, bytes per second
    /// (users report 35-45 MB/s).
    pub async_cross_account_bps: f64,
    /// Async copies into one account run one after another (reported by users;
    /// off by default).
    pub async_serial_per_account: bool,
    /// Requests one account answers per second before 503 ServerBusy.
    pub requests_per_second: u32,
    /// Retry-After sent with a 503, if any.
    pub retry_after: Option<Duration>,
    /// Share of requests failing with 500 OperationTimedOut.
    pub transient_failure_rate: f64,
    /// Share of cross-account copies that end `failed`.
    pub copy_failure_rate: f64,
    /// Time every request takes.
    pub latency: Duration,
    /// Copies finish the moment they start (unit tests); the bandwidths are ignored.
    pub instant_copies: bool,
    /// Ranges Get Page Ranges returns a page (the service: thousands).
    pub page_ranges_per_page: usize,
    /// The service does Put Page From URL; without it, 501 NotImplemented
    /// (as a service without the operation answers).
    pub put_page_from_url: bool,
}

impl SimConfig {
    /// Storage in memory with no delays, limits or faults: every copy is done at once.
    pub fn instant() -> Self {
        Self {
            latency: Duration::ZERO,
            instant_copies: true,
            ..Self::default()
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            blob_read_bps: 60.0 * MIB,
            account_ingress_bps: 25e9 / 8.0,
            account_egress_bps: 50e9 / 8.0,
            same_account_bps: 2048.0 * MIB,
            blob_write_bps: 60.0 * MIB,
            blob_requests_per_second: 500,
            async_cross_account_bps: 40e6,
            async_serial_per_account: false,
            requests_per_second: 20_000,
            retry_after: None,
            transient_failure_rate: 0.0,
            copy_failure_rate: 0.0,
            latency: Duration::from_millis(5),
            instant_copies: false,
            page_ranges_per_page: 10_000,
            put_page_from_url: true,
        }
    }
}

/// A fault the simulated store injects into requests that match it, for unit
/// tests of the slow and failing paths.
#[derive(Debug, Clone)]
pub struct SimFault {
    /// Operation name, e.g. `put_blob`, `get_properties`, `start_copy`.
    pub operation: &'static str,
    /// Only requests whose target (account/container/blob) contains this.
    pub target_contains: String,
    /// What happens to them.
    pub action: SimFaultAction,
    /// How many requests it hits; then it is spent.
    pub times: u32,
    /// Requests earlier than this (virtual time since the store was made) pass.
    pub from: Duration,
}

/// What an injected fault does.
#[derive(Debug, Clone, Copy)]
pub enum SimFaultAction {
    /// Answer with this HTTP status and service error code instead.
    Fail(u16, &'static str),
    /// Take this long before the request is handled.
    Delay(Duration),
    /// Never answer (the caller's timeout must end it).
    Hang,
}

/// What the simulation counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Requests answered (throttled and failed included).
    pub requests: u64,
    /// 503 ServerBusy answers.
    pub throttled: u64,
    /// 500 OperationTimedOut answers.
    pub transient_failures: u64,
    /// Copies started.
    pub copies_started: u64,
    /// Copies that ended failed.
    pub copies_failed: u64,
    /// Status requests (Get Blob Properties).
    pub status_requests: u64,
}

#[derive(Debug, Clone)]
enum Content {
    Real(Bytes),
    Virtual {
        len: u64,
        tail: Bytes,
    },
    /// A page blob written page by page: only its non-zero pieces are kept.
    Sparse {
        len: u64,
        pieces: BTreeMap<u64, Bytes>,
    },
}

impl Content {
    fn len(&self) -> u64 {
        match self {
            Content::Real(b) => b.len() as u64,
            Content::Virtual { len, .. } | Content::Sparse { len, .. } => *len,
        }
    }

    fn read(&self, range: Option<std::ops::Range<u64>>) -> Bytes {
        let len = self.len();
        let r = range.unwrap_or(0..len);
        let (start, end) = (r.start.min(len), r.end.min(len));
        if let Content::Real(b) = self {
            return b.slice(start as usize..end as usize);
        }
        let mut out = vec![0u8; (end - start) as usize];
        for (at, piece) in self.pieces(start..end) {
            let o = (at - start) as usize;
            out[o..o + piece.len()].copy_from_slice(&piece);
        }
        Bytes::from(out)
    }

    /// The pieces of `range` that may hold non-zero bytes, with their offsets.
    fn pieces(&self, range: std::ops::Range<u64>) -> Vec<(u64, Bytes)> {
        let cut = |at: u64, b: &Bytes| -> Option<(u64, Bytes)> {
            let end = at + b.len() as u64;
            let (s, e) = (at.max(range.start), end.min(range.end));
            (s < e).then(|| (s, b.slice((s - at) as usize..(e - at) as usize)))
        };
        match self {
            Content::Real(b) => cut(0, b).into_iter().collect(),
            Content::Virtual { len, tail } => {
                cut(len - tail.len() as u64, tail).into_iter().collect()
            }
            Content::Sparse { pieces, .. } => pieces
                .range(..range.end)
                .filter_map(|(at, b)| cut(*at, b))
                .collect(),
        }
    }

    /// Writes `data` at `at` (a page write).
    fn write(&mut self, at: u64, data: &[(u64, Bytes)], len: u64) {
        match self {
            Content::Real(old) => {
                let mut bytes = old.to_vec();
                bytes[at as usize..(at + len) as usize].fill(0);
                for (o, piece) in data {
                    bytes[*o as usize..*o as usize + piece.len()].copy_from_slice(piece);
                }
                *old = Bytes::from(bytes);
            }
            Content::Virtual { .. } => unreachable!("virtual blobs are not written"),
            Content::Sparse { pieces, .. } => {
                let end = at + len;
                let hit: Vec<u64> = pieces
                    .range(..end)
                    .filter(|(s, b)| **s + b.len() as u64 > at)
                    .map(|(s, _)| *s)
                    .collect();
                for s in hit {
                    let b = pieces.remove(&s).expect("listed piece");
                    let e = s + b.len() as u64;
                    if s < at {
                        pieces.insert(s, b.slice(..(at - s) as usize));
                    }
                    if e > end {
                        pieces.insert(end, b.slice((end - s) as usize..));
                    }
                }
                for (o, piece) in data {
                    if piece.iter().any(|b| *b != 0) {
                        pieces.insert(*o, piece.clone());
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Blob {
    content: Content,
    kind: BlobKind,
    etag: u64,
    metadata: Metadata,
    copy: Option<CopyInfo>,
    modified: OffsetDateTime,
    /// Pages written page by page (Put Page From URL), when the blob was made
    /// that way; else its written pages are its non-zero ones.
    written: Option<Vec<std::ops::Range<u64>>>,
}

/// The runs of non-zero 512-byte pages of `data`.
fn written_pages(data: &[u8]) -> Vec<std::ops::Range<u64>> {
    let pages = data
        .chunks(512)
        .enumerate()
        .filter(|(_, p)| p.iter().any(|b| *b != 0));
    crate::storage::merge_ranges(
        pages
            .map(|(i, p)| i as u64 * 512..i as u64 * 512 + p.len() as u64)
            .collect(),
    )
}

#[derive(Debug)]
struct State {
    rng: StdRng,
    blobs: BTreeMap<BlobPath, Blob>,
    containers: HashSet<(String, String)>,
    flows: Flows,
    last: Instant,
    next_etag: u64,
    next_flow: u64,
    next_snapshot: u64,
    windows: HashMap<String, (u64, u32)>,
    stats: SimStats,
    account_info: HashMap<String, AccountInfo>,
}

/// The simulated store.
#[derive(Debug)]
pub struct SimStore {
    cfg: SimConfig,
    state: Mutex<State>,
    faults: Mutex<Vec<SimFault>>,
    epoch: Instant,
}

impl SimStore {
    /// A store following `cfg`.
    pub fn new(cfg: SimConfig) -> Self {
        let now = Instant::now();
        Self {
            state: Mutex::new(State {
                rng: StdRng::seed_from_u64(cfg.seed),
                blobs: BTreeMap::new(),
                containers: HashSet::new(),
                flows: Flows::default(),
                last: now,
                next_etag: 0,
                next_flow: 0,
                next_snapshot: 0,
                windows: HashMap::new(),
                stats: SimStats::default(),
                account_info: HashMap::new(),
            }),
            cfg,
            epoch: now,
            faults: Mutex::new(Vec::new()),
        }
    }

    /// Injects `fault` into the requests that match it.
    pub(crate) fn inject(&self, fault: SimFault) {
        self.faults.lock().expect("faults lock").push(fault);
    }

    /// The action of the first live fault matching this request, spending one hit.
    fn fault_for(&self, operation: &str, target: &str) -> Option<SimFaultAction> {
        let now = Instant::now().saturating_duration_since(self.epoch);
        let mut faults = self.faults.lock().expect("faults lock");
        let f = faults.iter_mut().find(|f| {
            f.times > 0
                && f.from <= now
                && f.operation == operation
                && target.contains(&f.target_contains)
        })?;
        f.times -= 1;
        Some(f.action)
    }

    /// What was counted so far.
    pub fn stats(&self) -> SimStats {
        self.state.lock().expect("sim lock").stats.clone()
    }

    /// Makes `account` answer Get Account Information with this SKU and kind.
    pub(crate) fn set_account_info(&self, account: &str, info: AccountInfo) {
        self.state
            .lock()
            .expect("sim lock")
            .account_info
            .insert(account.to_owned(), info);
    }

    /// Creates a page blob of `len` bytes whose last bytes are `tail` (a VHD footer)
    /// and whose other bytes read as zeroes, without storing them.
    pub(crate) fn put_virtual_page_blob(&self, blob: &BlobPath, len: u64, tail: Bytes) {
        let mut s = self.state.lock().expect("sim lock");
        s.containers
            .insert((blob.account.clone(), blob.container.clone()));
        s.next_etag += 1;
        let etag = s.next_etag;
        s.blobs.insert(
            blob.clone(),
            Blob {
                content: Content::Virtual { len, tail },
                kind: BlobKind::Page,
                etag,
                metadata: Metadata::new(),
                copy: None,
                modified: OffsetDateTime::now_utc(),
                written: None,
            },
        );
    }

    /// Admits one request of `account`, or answers it with a 503 or a 500, after
    /// advancing every copy to now.
    async fn admit(
        &self,
        operation: &'static str,
        account: &str,
        target: &(dyn std::fmt::Display + Sync),
    ) -> StorageResult<std::sync::MutexGuard<'_, State>> {
        tokio::time::sleep(self.cfg.latency).await;
        match self.fault_for(operation, &target.to_string()) {
            None => {}
            Some(SimFaultAction::Delay(d)) => tokio::time::sleep(d).await,
            Some(SimFaultAction::Hang) => std::future::pending::<()>().await,
            Some(SimFaultAction::Fail(status, code)) => {
                return Err(ServiceError::http(operation, target, status, Some(code)))
            }
        }
        let mut s = self.state.lock().expect("sim lock");
        let now = Instant::now();
        advance(&self.cfg, &mut s, now);
        s.stats.requests += 1;
        let second = now.saturating_duration_since(self.epoch).as_secs();
        let window = s.windows.entry(account.to_owned()).or_insert((second, 0));
        if window.0 != second {
            *window = (second, 0);
        }
        window.1 += 1;
        if window.1 > self.cfg.requests_per_second {
            s.stats.throttled += 1;
            let mut e = ServiceError::http(operation, target, 503, Some("ServerBusy"));
            e.message =
                "HTTP 503 ServerBusy: Operations per second is over the account limit.".into();
            e.retry_after = self.cfg.retry_after;
            return Err(e);
        }
        if self.cfg.transient_failure_rate > 0.0
            && s.rng.random::<f64>() < self.cfg.transient_failure_rate
        {
            s.stats.transient_failures += 1;
            return Err(ServiceError::http(
                operation,
                target,
                500,
                Some("OperationTimedOut"),
            ));
        }
        Ok(s)
    }
}

/// Moves every copy forward to `now`, finishing those whose bytes have all flowed.
fn advance(cfg: &SimConfig, s: &mut State, now: Instant) {
    loop {
        if s.flows.is_empty() || now <= s.last {
            s.last = s.last.max(now);
            return;
        }
        let rates = s.flows.rates(cfg);
        // Earliest end (finish or failure) among the flows.
        let mut first: Option<f64> = None;
        for (f, r) in s.flows.iter().zip(&rates) {
            let t = ((f.end() - f.done).max(0.0)) / r.max(1e-9);
            if first.is_none_or(|best| t < best) {
                first = Some(t);
            }
        }
        let span = now.saturating_duration_since(s.last).as_secs_f64();
        let t = first.expect("flows are not empty");
        let step = t.min(span);
        s.flows.move_on(&rates, step);
        s.last += Duration::from_secs_f64(step);
        if t > span {
            s.last = now;
            return;
        }
        // End every flow that has reached its end.
        for f in s.flows.remove_where(cfg, |f| f.done + 1e-6 >= f.end()) {
            finish(s, f);
        }
    }
}

fn finish(s: &mut State, f: Flow) {
    let failed = f.fails_at.is_some();
    if failed {
        s.stats.copies_failed += 1;
    }
    if let Some(b) = s.blobs.get_mut(&f.dest) {
        if let Some(c) = b.copy.as_mut().filter(|c| c.id == f.id) {
            if failed {
                c.state = CopyState::Failed;
                c.description = Some("500 InternalError: the copy failed in the service".into());
            } else {
                c.state = CopyState::Success;
                c.copied = c.total;
                b.content = f.content;
                b.kind = f.kind;
                b.written = f.written;
            }
        }
    }
}

/// Takes a ranged write out of the flows when its request ends or is dropped.
struct FlowGuard<'a> {
    store: &'a SimStore,
    seq: u64,
}

impl Drop for FlowGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.store.state.lock() {
            let cfg = &self.store.cfg;
            s.flows.remove_where(cfg, |f| f.seq == self.seq);
        }
    }
}

impl SimStore {
    /// Creates a page blob of `len` bytes whose last bytes are `tail` and whose
    /// written pages are `written` (the rest of the data reads as zeroes), without
    /// storing them: a sparse VHD.
    pub(crate) fn put_virtual_sparse_page_blob(
        &self,
        blob: &BlobPath,
        len: u64,
        tail: Bytes,
        written: Vec<std::ops::Range<u64>>,
    ) {
        self.put_virtual_page_blob(blob, len, tail);
        let mut s = self.state.lock().expect("sim lock");
        if let Some(b) = s.blobs.get_mut(blob) {
            b.written = Some(crate::storage::merge_ranges(written));
        }
    }

    /// The checks of Put Page From URL, in the service's order: the range, the
    /// source and its authorization, the blob's request rate, the destination.
    fn check_page_write(
        &self,
        s: &mut State,
        dest: &BlobPath,
        range: &std::ops::Range<u64>,
        source_url: &str,
    ) -> StorageResult<BlobPath> {
        const OP: &str = "put_page_from_url";
        if !self.cfg.put_page_from_url {
            return Err(ServiceError::http(OP, dest, 501, Some("NotImplemented")));
        }
        let aligned = range.start.is_multiple_of(512) && range.end.is_multiple_of(512);
        if !aligned
            || range.is_empty()
            || range.end - range.start > crate::storage::MAX_PAGES_FROM_URL
        {
            return Err(ServiceError::http(OP, dest, 400, Some("InvalidPageRange")));
        }
        let source = copy_source(OP, dest, source_url, SourceRead::FromUrl)?;
        let second = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_secs();
        let window = s
            .windows
            .entry(format!("blob {dest}"))
            .or_insert((second, 0));
        if window.0 != second {
            *window = (second, 0);
        }
        window.1 += 1;
        if window.1 > self.cfg.blob_requests_per_second {
            s.stats.throttled += 1;
            let mut e = ServiceError::http(OP, dest, 503, Some("ServerBusy"));
            e.message = "HTTP 503 ServerBusy: the blob is over its request rate.".into();
            e.retry_after = self.cfg.retry_after;
            return Err(e);
        }
        if !s.blobs.contains_key(&source) {
            return Err(ServiceError::http(
                OP,
                dest,
                404,
                Some("CannotVerifyCopySource"),
            ));
        }
        match s.blobs.get(dest) {
            None => return Err(not_found(OP, dest)),
            Some(b) if matches!(b.content, Content::Virtual { .. }) => {
                return Err(ServiceError::other(
                    OP,
                    dest,
                    ErrorClass::Invalid,
                    "a simulated blob without real content",
                ))
            }
            Some(b) if range.end > b.content.len() => {
                return Err(ServiceError::http(OP, dest, 416, Some("InvalidPageRange")))
            }
            Some(_) => {}
        }
        Ok(source)
    }

    /// Waits until the ranged write `seq` has moved its bytes.
    async fn flow_done(&self, seq: u64) {
        loop {
            let wait = {
                let mut s = self.state.lock().expect("sim lock");
                advance(&self.cfg, &mut s, Instant::now());
                let Some(i) = s.flows.position(seq) else {
                    return;
                };
                let rate = s.flows.rate(&self.cfg, i);
                let f = s.flows.get(i);
                ((f.total - f.done).max(0.0) / rate.max(1.0)).min(3600.0)
            };
            tokio::time::sleep(Duration::from_secs_f64(wait).max(Duration::from_millis(1))).await;
        }
    }
}

fn not_found(op: &'static str, blob: &BlobPath) -> ServiceError {
    ServiceError::http(op, blob, 404, Some("BlobNotFound"))
}

#[async_trait]
impl BlobStore for SimStore {
    fn blob_url(&self, blob: &BlobPath) -> StorageResult<Url> {
        Ok(url_of(blob))
    }

    async fn copy_source_url(
        &self,
        source: &BlobPath,
        dest_account: &str,
        read: SourceRead,
        expiry: OffsetDateTime,
    ) -> StorageResult<String> {
        Ok(source_url_of(source, dest_account, read, expiry))
    }

    async fn ensure_container(&self, account: &str, container: &str) -> StorageResult<()> {
        let mut s = self.admit("create_container", account, &container).await?;
        s.containers
            .insert((account.to_owned(), container.to_owned()));
        Ok(())
    }

    async fn properties(&self, blob: &BlobPath) -> StorageResult<BlobProperties> {
        let mut s = self.admit("get_properties", &blob.account, blob).await?;
        s.stats.status_requests += 1;
        let flows: HashMap<String, f64> = s
            .flows
            .iter()
            .map(|f| (f.id.clone(), f.done / f.total.max(1.0)))
            .collect();
        let b = s
            .blobs
            .get(blob)
            .ok_or_else(|| not_found("get_properties", blob))?;
        let copy = b.copy.clone().map(|mut c| {
            if let Some(share) = flows.get(&c.id) {
                c.copied = (c.total as f64 * share) as u64;
            }
            c
        });
        Ok(BlobProperties {
            len: b.content.len(),
            kind: b.kind,
            etag: format!("\"0x{:X}\"", b.etag),
            metadata: b.metadata.clone(),
            copy,
        })
    }

    async fn snapshot(&self, blob: &BlobPath, metadata: &Metadata) -> StorageResult<String> {
        let mut s = self.admit("create_snapshot", &blob.account, blob).await?;
        let b = s
            .blobs
            .get(blob)
            .cloned()
            .ok_or_else(|| not_found("create_snapshot", blob))?;
        s.next_snapshot += 1;
        let stamp = format!("2026-01-01T00:00:00.{:07}Z", s.next_snapshot % 10_000_000);
        let snap = Blob {
            copy: None,
            metadata: metadata.clone(),
            modified: OffsetDateTime::now_utc(),
            ..b
        };
        s.blobs.insert(blob.at_snapshot(&stamp), snap);
        Ok(stamp)
    }

    async fn start_copy(
        &self,
        dest: &BlobPath,
        source_url: &str,
        metadata: &Metadata,
    ) -> StorageResult<CopyStarted> {
        const OP: &str = "start_copy";
        let mut s = self.admit(OP, &dest.account, dest).await?;
        let source = copy_source(OP, dest, source_url, SourceRead::CopyBlob)?;
        if !s
            .containers
            .contains(&(dest.account.clone(), dest.container.clone()))
        {
            return Err(ServiceError::http(OP, dest, 404, Some("ContainerNotFound")));
        }
        if s.blobs
            .get(dest)
            .and_then(|b| b.copy.as_ref())
            .map(|c| c.state)
            == Some(CopyState::Pending)
        {
            return Err(ServiceError::http(
                OP,
                dest,
                409,
                Some("PendingCopyOperation"),
            ));
        }
        let src = s
            .blobs
            .get(&source)
            .cloned()
            .ok_or_else(|| ServiceError::http(OP, dest, 404, Some("CannotVerifyCopySource")))?;
        let same_account = source.account == dest.account;
        let fails = !same_account
            && self.cfg.copy_failure_rate > 0.0
            && s.rng.random::<f64>() < self.cfg.copy_failure_rate;
        let fails_at = fails.then(|| s.rng.random_range(0.05..0.95));
        s.next_etag += 1;
        s.stats.copies_started += 1;
        let etag = s.next_etag;
        let id = format!("{:016x}-{etag}", s.rng.random::<u64>());
        let total = src.content.len();
        s.blobs.insert(
            dest.clone(),
            Blob {
                content: Content::Real(Bytes::new()),
                kind: src.kind,
                etag,
                metadata: metadata.clone(),
                copy: Some(CopyInfo {
                    id: id.clone(),
                    state: CopyState::Pending,
                    copied: 0,
                    total,
                    description: None,
                    source: Some(crate::azure::auth::redact_sas(source_url)),
                }),
                modified: OffsetDateTime::now_utc(),
                written: None,
            },
        );
        // Only a page blob's written pages move.
        let moved: u64 = src
            .written
            .as_ref()
            .map_or(total, |w| w.iter().map(|r| r.end - r.start).sum());
        s.next_flow += 1;
        let flow = Flow {
            id: id.clone(),
            dest: dest.clone(),
            source,
            content: src.content,
            kind: src.kind,
            total: moved as f64,
            done: 0.0,
            same_account,
            fails_at,
            ranged: false,
            seq: s.next_flow,
            written: src.written,
        };
        if self.cfg.instant_copies {
            finish(&mut s, flow);
        } else {
            s.flows.push(&self.cfg, flow);
            // A tiny copy may be done at once.
            let now = Instant::now();
            advance(&self.cfg, &mut s, now);
        }
        let state = s
            .blobs
            .get(dest)
            .and_then(|b| b.copy.as_ref())
            .map(|c| c.state)
            .unwrap_or(CopyState::Pending);
        Ok(CopyStarted { copy_id: id, state })
    }

    async fn abort_copy(&self, dest: &BlobPath, copy_id: &str) -> StorageResult<()> {
        let mut s = self.admit("abort_copy", &dest.account, dest).await?;
        let pending = s.flows.iter().any(|f| f.id == copy_id && &f.dest == dest);
        if !pending {
            return Err(ServiceError::http(
                "abort_copy",
                dest,
                409,
                Some("NoPendingCopyOperation"),
            ));
        }
        s.flows
            .remove_where(&self.cfg, |f| f.id == copy_id && &f.dest == dest);
        if let Some(b) = s.blobs.get_mut(dest) {
            b.content = Content::Real(Bytes::new());
            if let Some(c) = b.copy.as_mut() {
                c.state = CopyState::Aborted;
            }
        }
        Ok(())
    }

    async fn delete(&self, blob: &BlobPath) -> StorageResult<()> {
        let mut s = self.admit("delete", &blob.account, blob).await?;
        if s.blobs.remove(blob).is_none() {
            return Err(not_found("delete", blob));
        }
        if blob.snapshot.is_none() {
            s.blobs.retain(|k, _| {
                !(k.account == blob.account && k.container == blob.container && k.name == blob.name)
            });
            s.flows.remove_where(&self.cfg, |f| &f.dest == blob);
        }
        Ok(())
    }

    async fn delete_if_match(&self, blob: &BlobPath, etag: &str) -> StorageResult<()> {
        let mut s = self.admit("delete", &blob.account, blob).await?;
        let current = s.blobs.get(blob).map(|b| format!("\"0x{:X}\"", b.etag));
        check_condition(
            "delete",
            blob,
            &Condition::IfMatch(etag.to_owned()),
            current.as_deref(),
        )?;
        s.blobs.retain(|k, _| {
            !(k.account == blob.account && k.container == blob.container && k.name == blob.name)
        });
        s.flows.remove_where(&self.cfg, |f| &f.dest == blob);
        Ok(())
    }

    async fn account_info(&self, account: &str) -> StorageResult<AccountInfo> {
        let s = self.admit("get_account_info", account, &account).await?;
        Ok(s.account_info.get(account).cloned().unwrap_or(AccountInfo {
            sku: "Standard_LRS".into(),
            kind: "StorageV2".into(),
        }))
    }

    async fn put_block_blob(
        &self,
        blob: &BlobPath,
        data: Bytes,
        metadata: &Metadata,
        condition: Condition,
    ) -> StorageResult<String> {
        const OP: &str = "put_blob";
        let mut s = self.admit(OP, &blob.account, blob).await?;
        if !s
            .containers
            .contains(&(blob.account.clone(), blob.container.clone()))
        {
            return Err(ServiceError::http(OP, blob, 404, Some("ContainerNotFound")));
        }
        let current = s.blobs.get(blob).map(|b| format!("\"0x{:X}\"", b.etag));
        check_condition(OP, blob, &condition, current.as_deref())?;
        s.next_etag += 1;
        let etag = s.next_etag;
        s.blobs.insert(
            blob.clone(),
            Blob {
                content: Content::Real(data),
                kind: BlobKind::Block,
                etag,
                metadata: metadata.clone(),
                copy: None,
                modified: OffsetDateTime::now_utc(),
                written: None,
            },
        );
        Ok(format!("\"0x{etag:X}\""))
    }

    async fn put_page_blob(&self, blob: &BlobPath, data: Bytes) -> StorageResult<()> {
        let mut s = self.admit("put_page_blob", &blob.account, blob).await?;
        s.containers
            .insert((blob.account.clone(), blob.container.clone()));
        s.next_etag += 1;
        let etag = s.next_etag;
        s.blobs.insert(
            blob.clone(),
            Blob {
                content: Content::Real(data),
                kind: BlobKind::Page,
                etag,
                metadata: Metadata::new(),
                copy: None,
                modified: OffsetDateTime::now_utc(),
                written: None,
            },
        );
        Ok(())
    }

    async fn page_ranges_page(
        &self,
        blob: &BlobPath,
        marker: Option<&str>,
    ) -> StorageResult<(Vec<std::ops::Range<u64>>, Option<String>)> {
        // The marker is part of the target, so a fault can hit one page.
        let target = format!("{blob}?marker={}", marker.unwrap_or(""));
        let s = self
            .admit("get_page_ranges", &blob.account, &target)
            .await?;
        let b = s
            .blobs
            .get(blob)
            .ok_or_else(|| not_found("get_page_ranges", blob))?;
        let all = b.written.clone().unwrap_or_else(|| match &b.content {
            // Pages never written read as zeroes: a page of zeroes is taken as
            // unwritten, as our own uploads leave them.
            Content::Real(data) => written_pages(data),
            Content::Virtual { len, .. } => std::iter::once(0..*len).collect(),
            Content::Sparse { pieces, .. } => crate::storage::merge_ranges(
                pieces
                    .iter()
                    .map(|(at, b)| *at..*at + b.len() as u64)
                    .collect(),
            ),
        });
        // Pages of `page_ranges_per_page` ranges; the marker is where the next starts.
        let from: usize = marker.and_then(|m| m.parse().ok()).unwrap_or(0);
        let to = from
            .saturating_add(self.cfg.page_ranges_per_page.max(1))
            .min(all.len());
        let next = (to < all.len()).then(|| to.to_string());
        Ok((all[from.min(to)..to].to_vec(), next))
    }

    async fn create_page_blob(
        &self,
        blob: &BlobPath,
        len: u64,
        metadata: &Metadata,
    ) -> StorageResult<()> {
        const OP: &str = "create_page_blob";
        let mut s = self.admit(OP, &blob.account, blob).await?;
        if !len.is_multiple_of(512) {
            return Err(ServiceError::http(
                OP,
                blob,
                400,
                Some("InvalidHeaderValue"),
            ));
        }
        if !s
            .containers
            .contains(&(blob.account.clone(), blob.container.clone()))
        {
            return Err(ServiceError::http(OP, blob, 404, Some("ContainerNotFound")));
        }
        s.next_etag += 1;
        let etag = s.next_etag;
        s.blobs.insert(
            blob.clone(),
            Blob {
                content: Content::Sparse {
                    len,
                    pieces: BTreeMap::new(),
                },
                kind: BlobKind::Page,
                etag,
                metadata: metadata.clone(),
                copy: None,
                modified: OffsetDateTime::now_utc(),
                written: Some(Vec::new()),
            },
        );
        Ok(())
    }

    async fn put_pages_from_url(
        &self,
        dest: &BlobPath,
        range: std::ops::Range<u64>,
        source_url: &str,
    ) -> StorageResult<()> {
        const OP: &str = "put_page_from_url";
        let len = range.end - range.start;
        let (source, flow) = {
            let mut s = self.admit(OP, &dest.account, dest).await?;
            let source = self.check_page_write(&mut s, dest, &range, source_url)?;
            // The bytes flow for as long as the shared bandwidths say; the call
            // returns when they have.
            s.next_flow += 1;
            let seq = s.next_flow;
            let id = format!("range-{seq}");
            if !self.cfg.instant_copies {
                let cfg = &self.cfg;
                s.flows.push(
                    cfg,
                    Flow {
                        id: id.clone(),
                        dest: dest.clone(),
                        source: source.clone(),
                        content: Content::Real(Bytes::new()),
                        kind: BlobKind::Page,
                        total: len as f64,
                        done: 0.0,
                        same_account: source.account == dest.account,
                        fails_at: None,
                        ranged: true,
                        seq,
                        written: None,
                    },
                );
            }
            (source, (!self.cfg.instant_copies).then_some(seq))
        };
        if let Some(seq) = flow {
            let guard = FlowGuard { store: self, seq };
            self.flow_done(guard.seq).await;
        }
        let mut s = self.state.lock().expect("sim lock");
        let data = s
            .blobs
            .get(&source)
            .ok_or_else(|| ServiceError::http(OP, dest, 404, Some("CannotVerifyCopySource")))?
            .content
            .pieces(range.clone());
        s.next_etag += 1;
        let etag = s.next_etag;
        let b = s.blobs.get_mut(dest).ok_or_else(|| not_found(OP, dest))?;
        if range.end > b.content.len() || matches!(b.content, Content::Virtual { .. }) {
            return Err(ServiceError::http(OP, dest, 416, Some("InvalidPageRange")));
        }
        b.content.write(range.start, &data, len);
        let mut written = b.written.take().unwrap_or_default();
        written.push(range);
        b.written = Some(crate::storage::merge_ranges(written));
        b.etag = etag;
        b.modified = OffsetDateTime::now_utc();
        Ok(())
    }

    async fn read(
        &self,
        blob: &BlobPath,
        range: Option<std::ops::Range<u64>>,
    ) -> StorageResult<(Bytes, String)> {
        let s = self.admit("read", &blob.account, blob).await?;
        let b = s.blobs.get(blob).ok_or_else(|| not_found("read", blob))?;
        Ok((b.content.read(range), format!("\"0x{:X}\"", b.etag)))
    }

    async fn list(
        &self,
        account: &str,
        container: &str,
        prefix: &str,
    ) -> StorageResult<Vec<String>> {
        let s = self.admit("list_blobs", account, &container).await?;
        Ok(s.blobs
            .keys()
            .filter(|k| {
                k.account == account
                    && k.container == container
                    && k.snapshot.is_none()
                    && k.name.starts_with(prefix)
            })
            .map(|k| k.name.clone())
            .collect())
    }

    async fn list_detailed(
        &self,
        account: &str,
        container: &str,
        prefix: &str,
        snapshots: bool,
    ) -> StorageResult<Vec<crate::storage::ListedBlob>> {
        let s = self.admit("list_blobs", account, &container).await?;
        Ok(s.blobs
            .iter()
            .filter(|(k, _)| {
                k.account == account
                    && k.container == container
                    && (snapshots || k.snapshot.is_none())
                    && k.name.starts_with(prefix)
            })
            .map(|(k, b)| crate::storage::ListedBlob {
                name: k.name.clone(),
                snapshot: k.snapshot.clone(),
                metadata: b.metadata.clone(),
                last_modified: Some(b.modified),
            })
            .collect())
    }
}

/// Applies a write condition as the service does: 412 for an existing blob under
/// `IfAbsent` or another ETag under `IfMatch`, 404 for `IfMatch` on nothing.
fn check_condition(
    op: &'static str,
    blob: &BlobPath,
    condition: &Condition,
    current_etag: Option<&str>,
) -> StorageResult<()> {
    match (condition, current_etag) {
        (Condition::IfAbsent, Some(_)) => {
            Err(ServiceError::http(op, blob, 412, Some("BlobAlreadyExists")))
        }
        (Condition::IfMatch(_), None) => {
            Err(ServiceError::http(op, blob, 404, Some("BlobNotFound")))
        }
        (Condition::IfMatch(want), Some(have)) if want != have => {
            Err(ServiceError::http(op, blob, 412, Some("ConditionNotMet")))
        }
        _ => Ok(()),
    }
}

/// The blob a copy source URL names, refused as the service does when it is
/// not signed and must be: across accounts, or for a from-URL call
/// (`read`) even inside one.
fn copy_source(
    op: &'static str,
    dest: &BlobPath,
    source_url: &str,
    read: SourceRead,
) -> StorageResult<BlobPath> {
    let source = parse_source(source_url).ok_or_else(|| {
        ServiceError::other(
            op,
            dest,
            ErrorClass::Invalid,
            "copy source is not a URL of this store",
        )
    })?;
    let needs_sig = source.account != dest.account || read == SourceRead::FromUrl;
    if needs_sig && !source_url.contains("sig=") {
        return Err(ServiceError::http(
            op,
            dest,
            403,
            Some("CannotVerifyCopySource"),
        ));
    }
    Ok(source)
}

/// Parses a URL made by [`url_of`] (query parameters such as a SAS ignored).
fn parse_source(url: &str) -> Option<BlobPath> {
    let url = Url::parse(url).ok()?;
    let account = url
        .host_str()?
        .strip_suffix(DOMAIN)?
        .strip_suffix('.')?
        .to_owned();
    let mut segments = url.path_segments()?;
    let container = segments.next()?.to_owned();
    let name = segments.collect::<Vec<_>>().join("/");
    let name = percent_decode(&name);
    let snapshot = url
        .query_pairs()
        .find(|(k, _)| k == "snapshot")
        .map(|(_, v)| v.into_owned());
    Some(BlobPath {
        account,
        container,
        name,
        snapshot,
    })
}

/// The URL of `blob` on the simulated service.
fn url_of(blob: &BlobPath) -> Url {
    let mut url = Url::parse(&format!("http://{}.{DOMAIN}", blob.account))
        .expect("account names make valid host names");
    url.path_segments_mut()
        .expect("base URL")
        .push(&blob.container)
        .extend(blob.name.split('/'));
    if let Some(s) = &blob.snapshot {
        url.query_pairs_mut().append_pair("snapshot", s);
    }
    url
}

/// A copy-source URL: plain inside one account, with a stand-in SAS across accounts.
fn source_url_of(
    source: &BlobPath,
    dest_account: &str,
    read: SourceRead,
    expiry: OffsetDateTime,
) -> String {
    let mut url = url_of(source);
    if source.account != dest_account || read == SourceRead::FromUrl {
        url.query_pairs_mut()
            .append_pair("sp", "r")
            .append_pair("se", &crate::azure::auth::sas_time(expiry))
            .append_pair("sig", "simulated-signature");
    }
    url.to_string()
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signed source URL of `src` for a copy into `account`.
    async fn signed(store: &SimStore, src: &BlobPath, account: &str) -> String {
        store
            .copy_source_url(src, account, SourceRead::FromUrl, OffsetDateTime::now_utc())
            .await
            .unwrap()
    }

    fn vhd(store: &SimStore, blob: &BlobPath, gib: u64) -> u64 {
        let len = gib * 1024 * 1024 * 1024 + 512;
        let footer = crate::vhd::fixed_footer(len - 512, [1; 16]);
        store.put_virtual_page_blob(blob, len, Bytes::copy_from_slice(&footer));
        len
    }

    /// The simulated store's ranged copy: written ranges of a sparse source,
    /// Put Page From URL into an empty page blob, identical content and page
    /// ranges; unaligned, oversized and unsigned cross-account writes refused.
    #[tokio::test]
    async fn ranged_copies_keep_content_and_sparseness() {
        let store = SimStore::new(SimConfig::instant());
        let src = BlobPath::new("src", "c", "s.vhd");
        let mut data = vec![0u8; 64 * 1024];
        data[1024..3072].fill(7);
        data[40_000..40_100].fill(9);
        store
            .put_page_blob(&src, Bytes::from(data.clone()))
            .await
            .unwrap();
        let ranges = store.page_ranges(&src).await.unwrap();
        assert_eq!(ranges, vec![1024..3072, 39_936..40_448]);
        store.ensure_container("dst", "c").await.unwrap();
        let dest = BlobPath::new("dst", "c", "s.vhd");
        let meta: Metadata = [("k".to_owned(), "v".to_owned())].into();
        store
            .create_page_blob(&dest, data.len() as u64, &meta)
            .await
            .unwrap();
        assert!(store.page_ranges(&dest).await.unwrap().is_empty());
        let url = signed(&store, &src, "dst").await;
        for r in &ranges {
            store
                .put_pages_from_url(&dest, r.clone(), &url)
                .await
                .unwrap();
        }
        assert_eq!(store.read(&dest, None).await.unwrap().0, data);
        assert_eq!(store.page_ranges(&dest).await.unwrap(), ranges);
        assert_eq!(store.properties(&dest).await.unwrap().metadata, meta);
        let refused = |e: ServiceError| (e.status, e.code);
        let bad = store
            .put_pages_from_url(&dest, 100..612, &url)
            .await
            .unwrap_err();
        assert_eq!(refused(bad), (Some(400), Some("InvalidPageRange".into())));
        let big = store
            .put_pages_from_url(&dest, 0..8 * 1024 * 1024, &url)
            .await
            .unwrap_err();
        assert_eq!(refused(big), (Some(400), Some("InvalidPageRange".into())));
        let unsigned = url.split('?').next().unwrap().to_owned();
        let denied = store
            .put_pages_from_url(&dest, 0..512, &unsigned)
            .await
            .unwrap_err();
        assert_eq!(
            refused(denied),
            (Some(403), Some("CannotVerifyCopySource".into()))
        );
        // Inside one account too, Put Page From URL needs a signed source (a
        // Copy Blob does not), as the service requires.
        let beside = BlobPath::new("src", "c", "beside.vhd");
        store
            .create_page_blob(&beside, data.len() as u64, &meta)
            .await
            .unwrap();
        let plain = store
            .copy_source_url(&src, "src", SourceRead::CopyBlob, OffsetDateTime::now_utc())
            .await
            .unwrap();
        assert!(!plain.contains("sig="));
        let denied = store
            .put_pages_from_url(&beside, ranges[0].clone(), &plain)
            .await
            .unwrap_err();
        assert_eq!(
            refused(denied),
            (Some(403), Some("CannotVerifyCopySource".into()))
        );
        store
            .put_pages_from_url(
                &beside,
                ranges[0].clone(),
                &signed(&store, &src, "src").await,
            )
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_cross_account_copy_takes_its_bandwidth_time() {
        let store = SimStore::new(SimConfig {
            latency: Duration::ZERO,
            ..Default::default()
        });
        let src = BlobPath::new("src", "c", "d.vhd");
        let len = vhd(&store, &src, 6);
        store.ensure_container("dst", "c").await.unwrap();
        let dest = BlobPath::new("dst", "c", "d.vhd");
        let url = signed(&store, &src, "dst").await;
        let started = store
            .start_copy(&dest, &url, &Metadata::new())
            .await
            .unwrap();
        assert_eq!(started.state, CopyState::Pending);
        tokio::time::advance(Duration::from_secs(160)).await;
        let p = store.properties(&dest).await.unwrap();
        let c = p.copy.unwrap();
        assert_eq!(c.state, CopyState::Pending);
        assert!(c.copied > 0 && c.copied < c.total);
        // 6 GiB at the best-effort 40 MB/s (under the blob's 60 MiB/s): 161.1 s.
        tokio::time::advance(Duration::from_secs(2)).await;
        let p = store.properties(&dest).await.unwrap();
        assert_eq!(p.copy.unwrap().state, CopyState::Success);
        assert_eq!(p.len, len);
        let (tail, _) = store.read(&dest, Some(len - 512..len)).await.unwrap();
        crate::vhd::check_footer(&tail, len).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn readers_of_one_blob_share_its_bandwidth() {
        let store = SimStore::new(SimConfig {
            latency: Duration::ZERO,
            ..Default::default()
        });
        let src = BlobPath::new("src", "c", "d.vhd");
        vhd(&store, &src, 6);
        for a in ["d1", "d2"] {
            store.ensure_container(a, "c").await.unwrap();
            let url = signed(&store, &src, a).await;
            store
                .start_copy(&BlobPath::new(a, "c", "x"), &url, &Metadata::new())
                .await
                .unwrap();
        }
        tokio::time::advance(Duration::from_secs(150)).await;
        let p = store
            .properties(&BlobPath::new("d1", "c", "x"))
            .await
            .unwrap();
        assert_eq!(
            p.copy.unwrap().state,
            CopyState::Pending,
            "two readers: 204.8 s each"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        let p = store
            .properties(&BlobPath::new("d2", "c", "x"))
            .await
            .unwrap();
        assert_eq!(p.copy.unwrap().state, CopyState::Success);
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_request_rate_answers_server_busy() {
        let store = SimStore::new(SimConfig {
            requests_per_second: 5,
            latency: Duration::ZERO,
            retry_after: Some(Duration::from_secs(1)),
            ..Default::default()
        });
        let mut busy = 0;
        for _ in 0..8 {
            if let Err(e) = store.ensure_container("a", "c").await {
                assert_eq!(
                    (e.class, e.retry_after),
                    (ErrorClass::Throttled, Some(Duration::from_secs(1)))
                );
                busy += 1;
            }
        }
        assert_eq!(busy, 3);
        tokio::time::advance(Duration::from_secs(1)).await;
        store.ensure_container("a", "c").await.unwrap();
        assert_eq!(store.stats().throttled, 3);
    }

    /// A ranged write is synchronous and takes its share of the destination
    /// blob's write bandwidth; the blob's request rate answers 503 beyond; a
    /// sparse virtual source moves only its written pages, and its replica
    /// (ranged or async) has the same page ranges and footer.
    #[tokio::test(start_paused = true)]
    async fn ranged_writes_take_the_blobs_bandwidth_and_keep_sparseness() {
        const M: u64 = 1024 * 1024;
        let store = std::sync::Arc::new(SimStore::new(SimConfig {
            latency: Duration::ZERO,
            blob_requests_per_second: 4,
            ..Default::default()
        }));
        let src = BlobPath::new("src", "c", "d.vhd");
        let len = 1024 * M + 512;
        let footer = crate::vhd::fixed_footer(len - 512, [1; 16]);
        let written = vec![0..8 * M, 512 * M..520 * M, len - 512..len];
        store.put_virtual_sparse_page_blob(
            &src,
            len,
            Bytes::copy_from_slice(&footer),
            written.clone(),
        );
        store.ensure_container("dst", "c").await.unwrap();
        let dest = BlobPath::new("dst", "c", "d.vhd");
        store
            .create_page_blob(&dest, len, &Metadata::new())
            .await
            .unwrap();
        let url = signed(&store, &src, "dst").await;
        // One 4 MiB write alone: 4 MiB at 60 MiB/s.
        let t = Instant::now();
        store
            .put_pages_from_url(&dest, 0..4 * M, &url)
            .await
            .unwrap();
        let one = t.elapsed().as_secs_f64();
        assert!((one - 4.0 / 60.0).abs() < 0.01, "{one}");
        // Two at once share the blob: both take twice as long.
        let t = Instant::now();
        let (a, b) = tokio::join!(
            store.put_pages_from_url(&dest, 4 * M..8 * M, &url),
            store.put_pages_from_url(&dest, 512 * M..516 * M, &url)
        );
        a.unwrap();
        b.unwrap();
        let two = t.elapsed().as_secs_f64();
        assert!((two - 8.0 / 60.0).abs() < 0.01, "{two}");
        // The fourth write in one second is refused (the blob's rate is 4/s here).
        let busy = store
            .put_pages_from_url(&dest, 516 * M..520 * M, &url)
            .await;
        let busy = match busy {
            Err(e) => e,
            Ok(()) => store
                .put_pages_from_url(&dest, 516 * M..520 * M, &url)
                .await
                .unwrap_err(),
        };
        assert_eq!(
            (busy.status, busy.code.as_deref()),
            (Some(503), Some("ServerBusy"))
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        store
            .put_pages_from_url(&dest, 516 * M..520 * M, &url)
            .await
            .unwrap();
        store
            .put_pages_from_url(&dest, len - 512..len, &url)
            .await
            .unwrap();
        assert_eq!(store.page_ranges(&dest).await.unwrap(), written);
        let (tail, _) = store.read(&dest, Some(len - 512..len)).await.unwrap();
        crate::vhd::check_footer(&tail, len).unwrap();
        // An async copy of the sparse source moves 16 MiB (at the best-effort
        // rate), not 1 GiB, and keeps the page ranges.
        let copy = BlobPath::new("dst", "c", "async.vhd");
        let t = Instant::now();
        store
            .start_copy(&copy, &url, &Metadata::new())
            .await
            .unwrap();
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let p = store.properties(&copy).await.unwrap();
            if p.copy.unwrap().state == CopyState::Success {
                break;
            }
        }
        let took = t.elapsed().as_secs_f64();
        assert!((took - (16 * M + 512) as f64 / 40e6).abs() < 0.02, "{took}");
        assert_eq!(store.page_ranges(&copy).await.unwrap(), written);
    }

    /// A dropped ranged write (a cancelled copy) stops taking bandwidth.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_ranged_write_leaves_the_bandwidth() {
        const M: u64 = 1024 * 1024;
        let store = SimStore::new(SimConfig {
            latency: Duration::ZERO,
            ..Default::default()
        });
        let src = BlobPath::new("src", "c", "d.vhd");
        vhd(&store, &src, 1);
        store.ensure_container("dst", "c").await.unwrap();
        let dest = BlobPath::new("dst", "c", "d.vhd");
        store
            .create_page_blob(&dest, 1024 * M + 512, &Metadata::new())
            .await
            .unwrap();
        let url = signed(&store, &src, "dst").await;
        let dropped = tokio::time::timeout(
            Duration::from_millis(10),
            store.put_pages_from_url(&dest, 0..4 * M, &url),
        )
        .await;
        assert!(dropped.is_err(), "the write was still moving");
        assert!(store.state.lock().unwrap().flows.is_empty());
        assert!(store.page_ranges(&dest).await.unwrap().is_empty());
    }

    /// With async copies serialized per account, the second copy into an
    /// account starts moving only when the first is done.
    #[tokio::test(start_paused = true)]
    async fn serialized_async_copies_run_one_after_another() {
        let store = SimStore::new(SimConfig {
            latency: Duration::ZERO,
            async_serial_per_account: true,
            ..Default::default()
        });
        let src = BlobPath::new("src", "c", "d.vhd");
        vhd(&store, &src, 1);
        store.ensure_container("dst", "c").await.unwrap();
        let url = signed(&store, &src, "dst").await;
        for n in ["x", "y"] {
            store
                .start_copy(&BlobPath::new("dst", "c", n), &url, &Metadata::new())
                .await
                .unwrap();
        }
        // 1 GiB at 40 MB/s: 26.8 s for the first; the second has not moved.
        tokio::time::advance(Duration::from_secs(27)).await;
        let x = store
            .properties(&BlobPath::new("dst", "c", "x"))
            .await
            .unwrap();
        let y = store
            .properties(&BlobPath::new("dst", "c", "y"))
            .await
            .unwrap();
        assert_eq!(x.copy.unwrap().state, CopyState::Success);
        let y = y.copy.unwrap();
        assert_eq!(y.state, CopyState::Pending);
        assert!(y.copied < y.total / 50, "{}", y.copied);
        tokio::time::advance(Duration::from_secs(27)).await;
        let y = store
            .properties(&BlobPath::new("dst", "c", "y"))
            .await
            .unwrap();
        assert_eq!(y.copy.unwrap().state, CopyState::Success);
    }
}
