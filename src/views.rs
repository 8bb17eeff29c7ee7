//! The JSON views of jobs and pools, and byte counts for people: one place for
//! what the HTTP API answers and the command line prints.

use crate::state::{JobDocument, JobSummary, PoolNodes, PoolRecord};
use serde_json::{json, Value};

/// Adds a job's timing (elapsed, throughput, ETA, estimating) to its view.
fn with_timing(mut v: Value, s: &JobSummary) -> Value {
    let t = s.timing(time::OffsetDateTime::now_utc());
    if let (Value::Object(m), Ok(Value::Object(t))) = (&mut v, serde_json::to_value(t)) {
        m.extend(t);
        m.insert(
            "started_at".into(),
            json!(s.started_at.map(|t| t
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default())),
        );
    }
    v
}

/// Elapsed time, throughput and ETA in words: "elapsed 3 min 05 s, 61.2 MiB/s,
/// ETA 2 min 10 s" (or "estimating" while there is too little to go on).
pub(crate) fn timing_words(t: &crate::estimate::Timing) -> String {
    let mut parts = Vec::new();
    if let Some(e) = t.elapsed_seconds {
        parts.push(format!("elapsed {}", human_duration(e)));
    }
    if t.estimating {
        parts.push("throughput and ETA: estimating".to_owned());
    } else {
        if let Some(r) = t.throughput_bytes_per_second {
            parts.push(human_rate(r));
        }
        if let Some(e) = t.eta_seconds {
            parts.push(format!("ETA {}", human_duration(e)));
        }
    }
    parts.join(", ")
}

/// The JSON view of a job (CONTRACT.md `GET /v1/jobs/{id}`, plus extras).
pub(crate) fn job_view(d: &JobDocument) -> Value {
    with_timing(job_fields(d), &JobSummary::of(d))
}

fn job_fields(d: &JobDocument) -> Value {
    json!({
        "job_id": d.job_id,
        "state": d.state(),
        "phase": d.phase(),
        "error": d.error,
        "pool_id": d.pool_id(),
        "source": d.spec().map(|s| s.source.as_str()),
        "source_snapshot": d.source_snapshot,
        "created_at": d.created_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "updated_at": d.updated_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "cancel_requested": d.cancel_requested,
        "image_set": d.image_set,
        "progress": d.progress(),
        "gallery": d.gallery.as_ref().map(|g| json!({
            "version": g.version,
            "version_id": g.version_id,
            "replicas": g.replicas,
            "state": g.state,
            "replication_progress": g.progress,
            "staged_uri": g.staged_uri,
            "stalled": g.stalled,
            "history": g.history,
        })),
        "pool_stage": d.pool_stage,
        "submitted_by": d.spec().and_then(|s| s.submitted_by.as_deref()),
        "replicas": d.replicas.iter().map(|r| json!({
            "uri": r.uri,
            "account": r.account,
            "state": r.state,
            "bytes_copied": r.bytes_copied,
            "bytes_total": r.bytes_total,
            "attempts": r.attempts,
            "status_requests": r.status_requests,
            "method": r.method,
            "copied_from": r.copied_from,
            "error": r.error,
        })).collect::<Vec<_>>(),
    })
}

/// The gallery line of a job that publishes, for people: "gallery version
/// 2026.1201.1: creating, 4 replicas, replication 40%".
pub(crate) fn gallery_line(d: &JobDocument) -> Option<String> {
    d.gallery.as_ref().map(|g| {
        format!(
            "gallery version {}: {}, {} replicas, replication {:.0}%{}",
            g.version,
            g.state,
            g.replicas,
            g.progress * 100.0,
            if g.stalled {
                " (stalled: no progress for gallery.stall_minutes)"
            } else {
                ""
            }
        )
    })
}

/// The JSON view of a job in a list: its summary (no replica table; see
/// `GET /v1/jobs/{id}`).
pub(crate) fn summary_view(s: &JobSummary) -> Value {
    let mut v = serde_json::to_value(s).expect("summaries serialise");
    v["progress"] = json!(s.progress());
    with_timing(v, s)
}

/// The JSON view of a pool's image sets (CONTRACT.md `GET /v1/pools/{id}`).
pub(crate) fn pool_view(r: &PoolRecord, nodes: Option<&PoolNodes>) -> Value {
    let current = r.sets.last();
    json!({
        "pool_id": r.pool_id,
        "nodes": nodes,
        "source": current.map(|s| s.source.clone()),
        "snapshot": current.map(|s| s.source_snapshot.clone()),
        "replicas": current.map(|s| s.replicas.iter().filter(|x| !x.surplus).map(|x| json!({"uri": x.uri, "account": x.account, "job_id": x.job_id, "state": "verified"})).collect::<Vec<_>>()).unwrap_or_default(),
        "surplus": current.map(|s| s.replicas.iter().filter(|x| x.surplus).map(|x| json!({"uri": x.uri, "account": x.account, "job_id": x.job_id})).collect::<Vec<_>>()).unwrap_or_default(),
        "image_sets": r.sets.iter().map(|s| json!({
            "source": s.source,
            "snapshot": s.source_snapshot,
            "source_etag": s.source_etag,
            "bytes": s.source_bytes,
            "created_at": s.created_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "updated_at": s.updated_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "replicas": s.replicas.iter().map(|x| json!({"uri": x.uri, "account": x.account, "job_id": x.job_id, "surplus": x.surplus})).collect::<Vec<_>>(),
            "gallery_version": s.gallery_version.as_ref().map(|v| json!({"version": v.version, "version_id": v.version_id, "replicas": v.replicas})),
        })).collect::<Vec<_>>(),
    })
}

/// The pool stage's line for people: "pool stage: resize to 300 nodes,
/// resizing, 120 of 300 nodes".
pub(crate) fn pool_stage_line(d: &JobDocument) -> Option<String> {
    let s = d.pool_stage.as_ref()?;
    let action = match s.action {
        crate::state::PoolAction::Create => format!("create with {} nodes", s.target_nodes),
        crate::state::PoolAction::Resize => format!("resize to {} nodes", s.target_nodes),
        crate::state::PoolAction::None => "no change".to_owned(),
    };
    let mut line = format!(
        "pool stage: {action}, {}, {} of {} nodes",
        s.state.as_str(),
        s.current_nodes,
        s.target_nodes
    );
    if let Some(r) = &s.reason {
        line.push_str(&format!(" ({r})"));
    }
    if !s.errors.is_empty() {
        line.push_str(&format!("; Batch: {}", s.errors.join("; ")));
    }
    Some(line)
}

/// Bytes in binary units, for people.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A duration for people: "42 s", "3 min 05 s", "2 h 07 min".
pub(crate) fn human_duration(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {:02} s", s / 60, s % 60),
        s => format!("{} h {:02} min", s / 3600, s / 60 % 60),
    }
}

/// A throughput for people: "61.2 MiB/s".
pub(crate) fn human_rate(bytes_per_second: u64) -> String {
    format!("{}/s", human_bytes(bytes_per_second))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_rates_read_as_people_say_them() {
        assert_eq!(human_duration(42), "42 s");
        assert_eq!(human_duration(185), "3 min 05 s");
        assert_eq!(human_duration(7620), "2 h 07 min");
        assert_eq!(human_rate(3 * 1024 * 1024 / 2), "1.5 MiB/s");
    }
}
