//! The HTTP API: job routes (which only enqueue or read state), the status page,
//! Prometheus metrics, liveness and readiness.

use crate::app::{Control, SubmitError};
use crate::engine::LiveJobs;
use crate::job::parse_job_json;
use crate::state::{JobDocument, StateError};
use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{Html, IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use std::sync::Arc;

/// Shared state of the HTTP handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    control: Arc<Control>,
    live: LiveJobs,
}

impl AppState {
    /// State over a control plane and the jobs running here.
    pub fn new(control: Control, live: LiveJobs) -> Self {
        Self {
            control: Arc::new(control),
            live,
        }
    }

    /// The freshest view of a job: the live document when it runs here.
    async fn job(&self, id: &str) -> Result<Option<JobDocument>, StateError> {
        let live = self
            .live
            .lock()
            .expect("live lock")
            .get(id)
            .map(|d| d.lock().expect("live doc lock").clone());
        match live {
            Some(d) => Ok(Some(d)),
            None => Ok(self.control.state.load(id).await?.map(|(d, _)| d)),
        }
    }
}

/// All routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/jobs", post(submit).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/pools/{id}", get(get_pool).delete(retire_pool))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn authorised(state: &AppState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = &state.control.settings.admin_token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.expose_secret().as_bytes()) => Ok(()),
        _ => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "this route needs \"Authorization: Bearer <admin token>\"",
        ))),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The JSON view of a job (CONTRACT.md `GET /v1/jobs/{id}`, plus extras).
pub fn job_view(d: &JobDocument) -> Value {
    json!({
        "job_id": d.job_id,
        "state": d.state,
        "phase": d.phase,
        "error": d.error,
        "pool_id": d.spec.pool.id,
        "source": d.spec.source,
        "source_snapshot": d.source_snapshot,
        "created_at": d.created_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "updated_at": d.updated_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "cancel_requested": d.cancel_requested,
        "image_set": d.image_set,
        "progress": d.progress(),
        "replicas": d.replicas.iter().map(|r| json!({
            "uri": r.uri,
            "account": r.account,
            "state": r.state,
            "bytes_copied": r.bytes_copied,
            "bytes_total": r.bytes_total,
            "attempts": r.attempts,
            "status_requests": r.status_requests,
            "error": r.error,
        })).collect::<Vec<_>>(),
    })
}

async fn submit(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = authorised(&state, &headers) {
        return *r;
    }
    let text = match std::str::from_utf8(&body) {
        Ok(t) => t,
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "message: the body is not UTF-8 JSON",
            )
        }
    };
    let spec = match parse_job_json(text) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match state.control.submit(spec).await {
        Ok(s) => (
            StatusCode::ACCEPTED,
            Json(json!({ "job_id": s.job_id, "created": s.created })),
        )
            .into_response(),
        Err(SubmitError::Invalid(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn list_jobs(State(state): State<AppState>) -> Response {
    match state.control.state.list().await {
        Ok(docs) => {
            let mut views = Vec::with_capacity(docs.len());
            for d in docs {
                let fresh = state
                    .job(d.job_id.as_str())
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(d);
                views.push(job_view(&fresh));
            }
            Json(json!({ "jobs": views })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn get_job(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.job(&id).await {
        Ok(Some(d)) => Json(job_view(&d)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no job {id}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn cancel_job(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = authorised(&state, &headers) {
        return *r;
    }
    match state.control.cancel(&id).await {
        Ok(d) => (StatusCode::ACCEPTED, Json(json!({ "job_id": d.job_id, "state": d.state, "cancel_requested": d.cancel_requested }))).into_response(),
        Err(StateError::NotFound(_)) => error(StatusCode::NOT_FOUND, format!("no job {id}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The JSON view of a pool's image sets (CONTRACT.md `GET /v1/pools/{id}`).
pub fn pool_view(r: &crate::state::PoolRecord) -> Value {
    let current = r.sets.last();
    json!({
        "pool_id": r.pool_id,
        "source": current.map(|s| s.source.clone()),
        "snapshot": current.map(|s| s.source_snapshot.clone()),
        "replicas": current.map(|s| s.replicas.iter().map(|x| json!({"uri": x.uri, "account": x.account, "job_id": x.job_id, "state": "verified"})).collect::<Vec<_>>()).unwrap_or_default(),
        "image_sets": r.sets.iter().map(|s| json!({
            "source": s.source,
            "snapshot": s.source_snapshot,
            "source_etag": s.source_etag,
            "bytes": s.source_bytes,
            "created_at": s.created_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "updated_at": s.updated_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "replicas": s.replicas.iter().map(|x| json!({"uri": x.uri, "account": x.account, "job_id": x.job_id})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

async fn get_pool(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.control.state.load_pool(&id).await {
        Ok(Some((r, _))) => Json(pool_view(&r)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no image set for pool {id}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn retire_pool(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = authorised(&state, &headers) {
        return *r;
    }
    match state.control.state.load_pool(&id).await {
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no image set for pool {id}")),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Ok(Some(_)) => {}
    }
    match state.control.submit_retire(&id, None).await {
        Ok(s) => (StatusCode::ACCEPTED, Json(json!({ "job_id": s.job_id }))).into_response(),
        Err(SubmitError::Invalid(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.control.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let control = &state.control.settings.control;
    match state
        .control
        .store
        .list(&control.account, &control.state_container, "jobs/~none")
        .await
    {
        Ok(_) => "ready".into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("control account unreachable: {e}"),
        ),
    }
}

/// Bytes in binary units, for people.
pub fn human_bytes(n: u64) -> String {
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

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn status_page(State(state): State<AppState>) -> Response {
    let docs = match state.control.state.list().await {
        Ok(d) => d,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let mut rows = String::new();
    for d in docs {
        let d = state
            .job(d.job_id.as_str())
            .await
            .ok()
            .flatten()
            .unwrap_or(d);
        let pct = (d.progress() * 100.0).round();
        rows.push_str(&format!(
            "<section><h2>{} <small>{} · pool {} · {}</small></h2><progress max=\"100\" value=\"{pct}\"></progress> {pct}%",
            escape(d.job_id.as_str()),
            d.state.as_str(),
            escape(&d.spec.pool.id),
            d.phase.map(|p| format!("{p:?}").to_lowercase()).unwrap_or_default(),
        ));
        if let Some(e) = &d.error {
            rows.push_str(&format!("<p class=\"error\">{}</p>", escape(e)));
        }
        rows.push_str(
            "<table><tr><th>#</th><th>account</th><th>state</th><th>progress</th><th></th></tr>",
        );
        for r in &d.replicas {
            let p = if r.bytes_total == 0 {
                0.0
            } else {
                r.bytes_copied as f64 * 100.0 / r.bytes_total as f64
            };
            rows.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td><progress max=\"100\" value=\"{p:.0}\"></progress></td><td>{p:.0}% of {}{}</td></tr>",
                r.index,
                escape(&r.account),
                format!("{:?}", r.state).to_lowercase(),
                human_bytes(r.bytes_total),
                r.error.as_ref().map(|e| format!(" <span class=\"error\">{}</span>", escape(e))).unwrap_or_default(),
            ));
        }
        rows.push_str("</table></section>");
    }
    if rows.is_empty() {
        rows.push_str("<p>No jobs yet.</p>");
    }
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"3\"><title>vhd-replicator</title>\
         <style>body{{font-family:sans-serif;margin:2em}}progress{{width:14em}}.error{{color:#b00}}td,th{{padding:0 .8em;text-align:left}}</style>\
         </head><body><h1>vhd-replicator</h1>{rows}</body></html>"
    ))
    .into_response()
}
