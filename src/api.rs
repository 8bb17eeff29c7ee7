//! The HTTP API: job routes (which only enqueue or read state), the status page,
//! Prometheus metrics, liveness and readiness.

use crate::control::{Control, SubmitError};
use crate::engine::LiveJobs;
use crate::job::parse_job_json;
use crate::state::{JobDocument, JobListing, JobSummary, StateError};
use crate::views::{job_view, pool_view, summary_view};
use axum::{
    body::Bytes,
    extract::{Path, Query, State},
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
        .route("/jobs/{id}", get(job_page))
        .route("/pools", get(pools_page))
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

/// `GET /v1/jobs` query: a page of at most `limit` jobs after `cursor`.
#[derive(Debug, serde::Deserialize)]
struct Page {
    limit: Option<usize>,
    cursor: Option<String>,
}

/// Jobs per page unless asked otherwise, and at most.
const PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// Summaries of every job, newest first, the jobs running here fresh from
/// their live documents; with the documents that could not be read.
impl AppState {
    async fn summaries(&self) -> Result<JobListing, StateError> {
        let mut listing = self.control.state.list().await?;
        let live = self.live.lock().expect("live lock").clone();
        for s in listing.jobs.iter_mut() {
            if let Some(d) = live.get(&s.job_id) {
                *s = JobSummary::of(&d.lock().expect("live doc lock"));
            }
        }
        Ok(listing)
    }
}

/// Where a page ends: the last job's creation time and id (the list's order).
fn cursor_of(s: &JobSummary) -> String {
    format!("{}.{}", s.created_at.unix_timestamp_nanos(), s.job_id)
}

fn after_cursor(s: &JobSummary, cursor: &str) -> Option<bool> {
    let (nanos, id) = cursor.split_once('.')?;
    let nanos: i128 = nanos.parse().ok()?;
    Some((s.created_at.unix_timestamp_nanos(), s.job_id.as_str()) < (nanos, id))
}

async fn list_jobs(State(state): State<AppState>, Query(page): Query<Page>) -> Response {
    let limit = page.limit.unwrap_or(PAGE).clamp(1, MAX_PAGE);
    let listing = match state.summaries().await {
        Ok(l) => l,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let mut rest: Vec<&JobSummary> = listing.jobs.iter().collect();
    if let Some(cursor) = &page.cursor {
        let mut bad = false;
        rest.retain(|s| {
            after_cursor(s, cursor).unwrap_or_else(|| {
                bad = true;
                false
            })
        });
        if bad {
            return error(
                StatusCode::BAD_REQUEST,
                "cursor: not a cursor this API gave; use the \"next\" of the previous page",
            );
        }
    }
    let next = (rest.len() > limit).then(|| cursor_of(rest[limit - 1]));
    let jobs: Vec<Value> = rest.into_iter().take(limit).map(summary_view).collect();
    Json(json!({ "jobs": jobs, "next": next, "skipped": listing.skipped })).into_response()
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
        Ok(d) => (StatusCode::ACCEPTED, Json(json!({ "job_id": d.job_id, "state": d.state(), "cancel_requested": d.cancel_requested }))).into_response(),
        Err(StateError::NotFound(_)) => error(StatusCode::NOT_FOUND, format!("no job {id}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn get_pool(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.control.state.load_pool(&id).await {
        Ok(Some((r, _))) => {
            let nodes = state.control.state.pool_nodes(&id).await.ok().flatten();
            Json(pool_view(&r, nodes.as_ref())).into_response()
        }
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

#[derive(serde::Deserialize)]
struct PoolFilter {
    pool: Option<String>,
}

/// The overview: one listing of the job summaries, no document read.
async fn status_page(State(state): State<AppState>, Query(f): Query<PoolFilter>) -> Response {
    match state.summaries().await {
        Ok(listing) => Html(crate::pages::overview(
            &listing,
            f.pool.as_deref(),
            time::OffsetDateTime::now_utc(),
        ))
        .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// One job's page: one document read.
async fn job_page(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.job(&id).await {
        Ok(Some(d)) => {
            Html(crate::pages::job_page(&d, time::OffsetDateTime::now_utc())).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no job {id}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The pools page: the pool records.
async fn pools_page(State(state): State<AppState>) -> Response {
    match state.control.state.list_pools().await {
        Ok(pools) => {
            let mut nodes = std::collections::BTreeMap::new();
            for p in &pools {
                if let Ok(Some(n)) = state.control.state.pool_nodes(&p.pool_id).await {
                    nodes.insert(p.pool_id.clone(), n);
                }
            }
            Html(crate::pages::pools_page(
                &pools,
                &nodes,
                time::OffsetDateTime::now_utc(),
            ))
            .into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}
