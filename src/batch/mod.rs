//! The Azure Batch data plane, as far as the pool stage needs it: Pool - Get,
//! Pool - Add and Pool - Resize of REST API [`BATCH_API_VERSION`], with an
//! Entra token for `https://batch.core.windows.net/.default` on every
//! attempt (pool creation from a gallery image needs Entra authentication),
//! under the one retry policy.
//!
//! Batch answers errors as `{"code": "...", "message": {"value": "..."}}`:
//! 409 `PoolExists` for an Add of a pool that is there, a 409 while a pool is
//! resizing, 429 and 5xx when busy.

use crate::azure::{
    rest::{RestAnswer, RestClient, RestSettings},
    retry::{Idempotency, RetryPolicy},
    ErrorClass, ServiceError,
};
use crate::config::PoolStageConfig;
use crate::handoff::BATCH_API_VERSION;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;
use url::Url;

/// The token scope of the Batch data plane.
pub(crate) const BATCH_SCOPE: &str = "https://batch.core.windows.net/.default";

/// A pool as Pool - Get gives it, as far as the stage reads it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BatchPool {
    /// Pool id.
    pub(crate) id: String,
    /// `virtualMachineConfiguration.imageReference.virtualMachineImageId`.
    pub(crate) image_id: Option<String>,
    /// `steady`, `resizing` or `stopping`.
    pub(crate) allocation_state: String,
    /// `targetDedicatedNodes`.
    pub(crate) target_dedicated: u32,
    /// `currentDedicatedNodes`.
    pub(crate) current_dedicated: u32,
    /// `enableAutoScale`.
    pub(crate) auto_scale: bool,
    /// `resizeErrors`, each `code: message` in Batch's words.
    pub(crate) resize_errors: Vec<String>,
}

impl BatchPool {
    fn from_json(v: &Value) -> Self {
        let count = |k: &str| v[k].as_u64().unwrap_or(0) as u32;
        Self {
            id: v["id"].as_str().unwrap_or_default().to_owned(),
            image_id: v["virtualMachineConfiguration"]["imageReference"]["virtualMachineImageId"]
                .as_str()
                .map(str::to_owned),
            allocation_state: v["allocationState"].as_str().unwrap_or("steady").to_owned(),
            target_dedicated: count("targetDedicatedNodes"),
            current_dedicated: count("currentDedicatedNodes"),
            auto_scale: v["enableAutoScale"].as_bool().unwrap_or(false),
            resize_errors: v["resizeErrors"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    format!(
                        "{}: {}",
                        e["code"].as_str().unwrap_or("ResizeError"),
                        e["message"].as_str().unwrap_or_default()
                    )
                })
                .collect(),
        }
    }

    /// Whether the pool is done allocating.
    pub(crate) fn steady(&self) -> bool {
        self.allocation_state.eq_ignore_ascii_case("steady")
    }

    /// Whether the pool boots `image_id` (ARM ids compare without case).
    pub(crate) fn boots(&self, image_id: &str) -> bool {
        self.image_id
            .as_deref()
            .is_some_and(|i| i.eq_ignore_ascii_case(image_id))
    }
}

/// Shows what Batch said of `pool` (and what its image serves, when known)
/// to operators: the pool gauges, and the observation the pools page reads.
/// A failure to write the observation is only logged.
pub(crate) async fn observe(
    metrics: &crate::metrics::Metrics,
    state: &crate::state::StateStore,
    pool: &BatchPool,
    capacity: Option<u32>,
) {
    metrics.pool_nodes(&pool.id, pool.target_dedicated, pool.current_dedicated);
    if let Some(c) = capacity {
        metrics.pool_capacity(&pool.id, c);
    }
    let nodes = crate::state::PoolNodes {
        target_nodes: pool.target_dedicated,
        current_nodes: pool.current_dedicated,
        image_capacity_nodes: capacity,
        resize_errors: pool.resize_errors.clone(),
        at: time::OffsetDateTime::now_utc(),
    };
    if let Err(e) = state.put_pool_nodes(&pool.id, &nodes).await {
        tracing::debug!(pool = %pool.id, error = %e, "cannot record the pool's nodes");
    }
}

/// What a Pool - Add did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Added {
    /// 201: created now.
    Created,
    /// 409 `PoolExists`: it was there already.
    Exists,
}

/// What a Pool - Resize did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resized {
    /// 202: the resize started.
    Accepted,
    /// 409: the pool is resizing (or stopping) now; ask again once steady.
    Busy,
}

/// A Batch client of one account.
#[derive(Debug)]
pub(crate) struct Batch {
    rest: RestClient,
    endpoint: Url,
}

impl Batch {
    /// A client of `[pool_stage]`'s account.
    pub(crate) fn new(
        cfg: &PoolStageConfig,
        retry: RetryPolicy,
        connect_timeout: Duration,
    ) -> Result<Self, ServiceError> {
        let rest = RestClient::new(RestSettings {
            ca_pem: cfg.ca_pem.as_deref().map(|p| (p, "pool_stage.ca_file")),
            credential: cfg.credential.clone(),
            scope: BATCH_SCOPE.to_owned(),
            retry,
            connect_timeout,
            map_error: batch_error,
            content_type: "application/json; odata=minimalmetadata",
        })?;
        Ok(Self {
            rest,
            endpoint: cfg.batch_url.clone(),
        })
    }

    fn url(&self, path: &str) -> Url {
        let mut url = self.endpoint.clone();
        url.path_segments_mut()
            .expect("an http(s) URL")
            .pop_if_empty()
            .extend(path.split('/'));
        url.query_pairs_mut()
            .append_pair("api-version", BATCH_API_VERSION);
        url
    }

    /// Pool - Get; `None` for 404 `PoolNotFound`.
    pub(crate) async fn pool(&self, id: &str) -> Result<Option<BatchPool>, ServiceError> {
        let url = self.url(&format!("pools/{id}"));
        match self
            .rest
            .call("pool_get", Method::GET, &url, None, Idempotency::Idempotent)
            .await
        {
            Ok(a) => Ok(Some(BatchPool::from_json(&a.body))),
            Err(e) if e.class == ErrorClass::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Pool - Add. Not sent twice blindly: an Add whose answer was lost is
    /// settled by the caller with a Pool - Get.
    pub(crate) async fn add_pool(&self, body: &Value) -> Result<Added, ServiceError> {
        let url = self.url("pools");
        match self
            .rest
            .call(
                "pool_add",
                Method::POST,
                &url,
                Some(body),
                Idempotency::NotIdempotent,
            )
            .await
        {
            Ok(RestAnswer { .. }) => Ok(Added::Created),
            Err(e) if e.code.as_deref() == Some("PoolExists") => Ok(Added::Exists),
            Err(e) => Err(e),
        }
    }

    /// Pool - Resize to `target` dedicated nodes within `resize_timeout`.
    /// Sending it twice asks for the same target, so it is idempotent.
    pub(crate) async fn resize_pool(
        &self,
        id: &str,
        target: u32,
        resize_timeout: &str,
    ) -> Result<Resized, ServiceError> {
        let url = self.url(&format!("pools/{id}/resize"));
        let body = json!({"targetDedicatedNodes": target, "resizeTimeout": resize_timeout});
        match self
            .rest
            .call(
                "pool_resize",
                Method::POST,
                &url,
                Some(&body),
                Idempotency::Idempotent,
            )
            .await
        {
            Ok(_) => Ok(Resized::Accepted),
            Err(e) if e.status == Some(409) && resizing(e.code.as_deref()) => Ok(Resized::Busy),
            Err(e) => Err(e),
        }
    }
}

/// Whether a 409 code says the pool is resizing or stopping one (the names
/// Batch has used for it).
fn resizing(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("PoolBeingResized" | "PoolResizing" | "PoolIsResizing" | "PoolResizeStopping")
    )
}

/// Batch's `code: message.value`, or the body.
fn error_text(body: &Value) -> (Option<String>, String) {
    let code = body["code"].as_str().map(str::to_owned);
    let message = body["message"]["value"]
        .as_str()
        .or_else(|| body["message"].as_str())
        .map(str::to_owned);
    let text = match (&code, message) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (None, Some(m)) => m,
        (Some(c), None) => c.clone(),
        (None, None) => body.to_string(),
    };
    (code, text)
}

/// A Batch failure, classified for the retry policy and told in words a
/// person can act on.
fn batch_error(
    operation: &'static str,
    target: &str,
    status: u16,
    body: &Value,
    retry_after: Option<Duration>,
) -> ServiceError {
    let (code, detail) = error_text(body);
    let mut e = ServiceError::http(operation, target, status, code.as_deref());
    e.message = match status {
        401 => format!("{detail}; the Entra token was refused: check pool_stage.credential and the identity's tenant"),
        403 => format!("{detail}; assign the daemon's identity \"Azure Batch Contributor\" (or a custom role with Microsoft.Batch/batchAccounts/pools/write) on the Batch account"),
        _ => detail,
    };
    e.retry_after = retry_after;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_and_errors_read_as_batch_writes_them() {
        let p = BatchPool::from_json(&json!({
            "id": "render", "allocationState": "resizing",
            "targetDedicatedNodes": 200, "currentDedicatedNodes": 40,
            "enableAutoScale": false,
            "virtualMachineConfiguration": {"imageReference": {"virtualMachineImageId": "/Subscriptions/S/x/versions/1"}},
            "resizeErrors": [{"code": "AccountCoreQuotaReached", "message": "The specified account has reached VM core quota"}]
        }));
        assert!(!p.steady() && p.boots("/subscriptions/s/X/versions/1"));
        assert_eq!((p.target_dedicated, p.current_dedicated), (200, 40));
        assert_eq!(
            p.resize_errors,
            ["AccountCoreQuotaReached: The specified account has reached VM core quota"]
        );
        let e = batch_error(
            "pool_add",
            "/pools",
            409,
            &json!({"code": "PoolExists", "message": {"lang": "en-US", "value": "The specified pool already exists."}}),
            None,
        );
        assert_eq!(e.code.as_deref(), Some("PoolExists"));
        assert_eq!(e.message, "PoolExists: The specified pool already exists.");
        let busy = batch_error(
            "pool_add",
            "/pools",
            429,
            &Value::Null,
            Some(Duration::from_secs(3)),
        );
        assert!(busy.class.is_retryable() && busy.retry_after == Some(Duration::from_secs(3)));
        assert!(resizing(Some("PoolBeingResized")) && !resizing(Some("PoolExists")));
    }
}
