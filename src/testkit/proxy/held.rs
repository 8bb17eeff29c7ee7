//! Copies held pending for a while, as the service reports a copy in flight.

use super::*;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub(super) struct Held {
    pub(super) copy_id: String,
    pub(super) started: Instant,
    pub(super) aborted: bool,
}

/// Abort Copy of a copy held pending (Azurite finished it long ago): answered
/// here, and the copy shows `aborted` from then on.
pub(super) fn abort_held(
    shared: &Shared,
    seen: &Seen,
    headers: &hyper::HeaderMap,
) -> Option<Response<Full<Bytes>>> {
    let is_abort = seen.method == hyper::Method::PUT
        && seen.comp().as_deref() == Some("copy")
        && headers
            .get("x-ms-copy-action")
            .and_then(|v| v.to_str().ok())
            == Some("abort");
    if !is_abort {
        return None;
    }
    let copy_id = query_has(&seen.query, "copyid").unwrap_or_default();
    let mut held = shared.held.lock().expect("held lock");
    let h = held
        .get_mut(&seen.path)
        .filter(|h| h.copy_id == copy_id && !h.aborted)?;
    let pending = shared
        .cfg
        .hold_copies
        .is_some_and(|hold| h.started.elapsed() < hold);
    if !pending {
        return None;
    }
    h.aborted = true;
    ProxyStats::bump(&shared.stats.aborted);
    Some(
        Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Full::new(Bytes::new()))
            .expect("static response builds"),
    )
}

/// A Start Copy Azurite finished at once is reported pending and held for
/// `hold_copies`.
pub(super) fn hold_started_copy(shared: &Shared, path: &str, headers: &mut hyper::HeaderMap) {
    if shared.cfg.hold_copies.is_none() {
        return;
    }
    let Some(id) = headers.get("x-ms-copy-id").and_then(|v| v.to_str().ok()) else {
        return;
    };
    shared.held.lock().expect("held lock").insert(
        path.to_owned(),
        Held {
            copy_id: id.to_owned(),
            started: Instant::now(),
            aborted: false,
        },
    );
    ProxyStats::bump(&shared.stats.held);
    headers.insert(
        "x-ms-copy-status",
        "pending".parse().expect("static header"),
    );
}

/// The status of a held copy as Azure would show it: pending with progress
/// advancing linearly over the hold, or aborted.
pub(super) fn show_held_copy(shared: &Shared, path: &str, headers: &mut hyper::HeaderMap) {
    let held = shared.held.lock().expect("held lock").get(path).cloned();
    let (Some(h), Some(hold)) = (held, shared.cfg.hold_copies) else {
        return;
    };
    let ours =
        headers.get("x-ms-copy-id").and_then(|v| v.to_str().ok()) == Some(h.copy_id.as_str());
    let total: u64 = headers
        .get("x-ms-copy-progress")
        .and_then(|v| v.to_str().ok())
        .and_then(|p| p.split('/').nth(1))
        .and_then(|t| t.parse().ok())
        .or_else(|| {
            headers
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    if ours && h.aborted {
        headers.insert(
            "x-ms-copy-status",
            "aborted".parse().expect("static header"),
        );
        headers.insert(
            "x-ms-copy-progress",
            format!("0/{total}").parse().expect("ascii"),
        );
    } else if ours && h.started.elapsed() < hold {
        let share = h.started.elapsed().as_secs_f64() / hold.as_secs_f64();
        let copied = (total as f64 * share) as u64;
        headers.insert(
            "x-ms-copy-status",
            "pending".parse().expect("static header"),
        );
        headers.insert(
            "x-ms-copy-progress",
            format!("{copied}/{total}").parse().expect("ascii"),
        );
        ProxyStats::bump(&shared.stats.pending_answers);
    }
}
