//! What the proxy saw: every request, in order, with its time and answer.

use super::*;
use hyper::{body::Incoming, Request};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::time::Instant;

/// What the proxy has seen and done.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Requests received.
    pub requests: AtomicU64,
    /// 503s injected.
    pub busy: AtomicU64,
    /// 503s injected with Retry-After.
    pub busy_with_retry_after: AtomicU64,
    /// 500s injected.
    pub timeouts: AtomicU64,
    /// Connections reset.
    pub resets: AtomicU64,
    /// Latency spikes added.
    pub spikes: AtomicU64,
    /// Copies held pending.
    pub held: AtomicU64,
    /// Pending copies aborted.
    pub aborted: AtomicU64,
    /// Status answers rewritten to pending.
    pub pending_answers: AtomicU64,
    /// Requests hit by a scripted rule.
    pub rule_hits: AtomicU64,
}

impl ProxyStats {
    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// What the proxy needs to know of a request.
pub(super) struct Seen {
    pub(super) method: hyper::Method,
    pub(super) path: String,
    pub(super) query: String,
}

impl Seen {
    pub(super) fn comp(&self) -> Option<String> {
        query_has(&self.query, "comp")
    }

    /// The service fetching a copy source (a read that carries a SAS): passed
    /// through untouched.
    pub(super) fn is_service_read(&self) -> bool {
        self.query.contains("sig=")
            && (self.method == hyper::Method::GET || self.method == hyper::Method::HEAD)
    }
}

/// Counts and logs a request (and the copy source of a Start Copy).
pub(super) fn record(shared: &Shared, req: &Request<Incoming>) -> Seen {
    ProxyStats::bump(&shared.stats.requests);
    let seen = Seen {
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().unwrap_or("").to_owned(),
    };
    {
        // Both lists under the first's lock, so their entries stay paired.
        let mut all = shared.seen.lock().expect("seen lock");
        all.push(format!("{} {}?{}", seen.method, seen.path, seen.query));
        shared
            .seen_at
            .lock()
            .expect("seen lock")
            .push(Instant::now());
    }
    if let Some(source) = req
        .headers()
        .get("x-ms-copy-source")
        .and_then(|v| v.to_str().ok())
    {
        shared
            .copy_sources
            .lock()
            .expect("sources lock")
            .push((seen.path.clone(), source.to_owned()));
    }
    seen
}
