//! The proxy's faults: scripted rules and random ones, and the answers they give.

use super::*;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use rand::Rng;
use std::time::Duration;

/// A scripted fault for the requests that match it.
#[derive(Debug, Clone)]
pub struct ProxyRule {
    /// HTTP method, e.g. `PUT`; any when `None`.
    pub method: Option<&'static str>,
    /// The request path contains this.
    pub path_contains: String,
    /// The query string contains this, when set.
    pub query_contains: Option<String>,
    /// The request carries this header, when set (e.g. `x-ms-copy-source`).
    pub header: Option<&'static str>,
    /// What happens to a matching request.
    pub action: ProxyAction,
    /// How many requests it hits.
    pub times: u32,
}

impl ProxyRule {
    /// A rule for `times` requests of `method` whose path contains `path`.
    pub fn new(method: &'static str, path: &str, action: ProxyAction, times: u32) -> Self {
        Self {
            method: Some(method),
            path_contains: path.to_owned(),
            query_contains: None,
            header: None,
            action,
            times,
        }
    }

    fn matches(
        &self,
        method: &hyper::Method,
        path: &str,
        query: &str,
        headers: &hyper::HeaderMap,
    ) -> bool {
        self.method.is_none_or(|m| m == method.as_str())
            && path.contains(&self.path_contains)
            && self
                .query_contains
                .as_deref()
                .is_none_or(|q| query.contains(q))
            && self.header.is_none_or(|h| headers.contains_key(h))
    }
}

/// What a [`ProxyRule`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyAction {
    /// Hold the request forever without forwarding it: nothing happens upstream.
    Swallow,
    /// Forward the request, then never answer: it happened, the caller cannot know.
    LoseAnswer,
    /// Answer at once with this status and error code, without forwarding.
    Answer(u16, &'static str),
    /// Wait this long, then forward it as usual (a slow service).
    Delay(Duration),
    /// Answer at once with 503 ServerBusy carrying `Retry-After` of this many
    /// seconds, without forwarding.
    Busy(u64),
}

#[derive(Debug)]
pub(super) struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("injected connection reset")
    }
}

impl std::error::Error for Reset {}

/// The first scripted rule with hits left that matches the request, spending one.
pub(super) fn scripted_fault(
    shared: &Shared,
    seen: &Seen,
    headers: &hyper::HeaderMap,
) -> Option<ProxyAction> {
    let mut left = shared.rules_left.lock().expect("rules lock");
    let action = shared
        .cfg
        .rules
        .iter()
        .zip(left.iter_mut())
        .find(|(r, n)| **n > 0 && r.matches(&seen.method, &seen.path, &seen.query, headers))
        .map(|(r, n)| {
            *n -= 1;
            r.action
        });
    if action.is_some() {
        ProxyStats::bump(&shared.stats.rule_hits);
    }
    action
}

/// A seeded random fault: a latency spike (then on), a reset, a 503 (with or
/// without Retry-After) or a 500 OperationTimedOut.
pub(super) async fn random_fault(shared: &Shared) -> Option<Result<Response<Full<Bytes>>, Reset>> {
    let stats = &shared.stats;
    let (reset, busy, retry_after, timeout, spike) = {
        let mut rng = shared.rng.lock().expect("rng lock");
        let cfg = &shared.cfg;
        (
            rng.random::<f64>() < cfg.reset_rate,
            rng.random::<f64>() < cfg.busy_rate,
            rng.random::<f64>() < cfg.retry_after_share,
            rng.random::<f64>() < cfg.timeout_rate,
            rng.random::<f64>() < cfg.spike_rate,
        )
    };
    if spike {
        ProxyStats::bump(&stats.spikes);
        tokio::time::sleep(shared.cfg.spike).await;
    }
    if reset {
        ProxyStats::bump(&stats.resets);
        return Some(Err(Reset));
    }
    if busy {
        ProxyStats::bump(&stats.busy);
        if retry_after {
            ProxyStats::bump(&stats.busy_with_retry_after);
        }
        return Some(Ok(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServerBusy",
            "Operations per second is over the account limit.",
            retry_after,
        )));
    }
    if timeout {
        ProxyStats::bump(&stats.timeouts);
        return Some(Ok(error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "OperationTimedOut",
            "Operation could not be completed within the specified time.",
            false,
        )));
    }
    None
}
