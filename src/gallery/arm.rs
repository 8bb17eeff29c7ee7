//! Azure Resource Manager requests: an Entra bearer token for the management
//! scope on every attempt, each attempt under the retry policy's timeout, 429,
//! 5xx and 409 (another operation on the resource) retried with Retry-After, and
//! long-running operations followed as ARM documents them: the
//! `Azure-AsyncOperation` URL first, else `Location`, else the resource's
//! `provisioningState`.

use crate::azure::{
    rest::{RestClient, RestSettings},
    retry::{Idempotency, RetryPolicy},
    ErrorClass, ServiceError,
};
use crate::config::GalleryConfig;

/// Result of a Resource Manager call.
pub(crate) type ArmResult<T> = Result<T, ServiceError>;
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;
use url::Url;

/// The Compute (gallery) API version of every request.
pub(crate) const API_VERSION: &str = "2025-03-03";

/// One answer of ARM.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The JSON body (`Null` when empty).
    pub body: Value,
    /// How to follow the operation the request started.
    pub operation: Operation,
    /// Retry-After, when given.
    pub retry_after: Option<Duration>,
}

/// A long-running operation, and where to ask about it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "url", rename_all = "snake_case")]
pub enum Operation {
    /// `Azure-AsyncOperation`: its `status` says InProgress, Succeeded, Failed or Canceled.
    AsyncOperation(String),
    /// `Location`: 202 while running, 200/201/204 when done.
    Location(String),
    /// No header: the resource's `provisioningState` says.
    Resource(String),
}

/// Where a long-running operation stands.
#[derive(Debug, Clone, PartialEq)]
pub enum OperationState {
    /// Still running; ask again after this long (Retry-After, when given).
    Running(Option<Duration>),
    /// Done.
    Succeeded,
    /// Failed or cancelled, with ARM's reason.
    Failed(String),
}

/// An ARM client for one deployment's `[gallery]`.
#[derive(Debug)]
pub(crate) struct Arm {
    rest: RestClient,
    endpoint: Url,
}

/// The token scope for an ARM endpoint: its origin's `.default`, and for a
/// loopback endpoint (a local fake) the public cloud's.
pub(crate) fn scope_for(endpoint: &Url) -> String {
    let loopback = match endpoint.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => true,
    };
    if loopback {
        "https://management.azure.com/.default".into()
    } else {
        format!("{}/.default", endpoint.origin().ascii_serialization())
    }
}

impl Arm {
    /// A client with the configured timeouts and extra CA.
    pub(crate) fn new(
        cfg: &GalleryConfig,
        retry: RetryPolicy,
        connect_timeout: Duration,
    ) -> ArmResult<Self> {
        let rest = RestClient::new(RestSettings {
            ca_pem: cfg.ca_pem.as_deref().map(|p| (p, "gallery.ca_file")),
            credential: cfg.credential.clone(),
            scope: scope_for(&cfg.arm_endpoint),
            retry,
            connect_timeout,
            map_error: arm_error,
            content_type: "application/json",
        })?;
        Ok(Self {
            rest,
            endpoint: cfg.arm_endpoint.clone(),
        })
    }

    /// The URL of an ARM resource path (`/subscriptions/...`) with the API version.
    pub(crate) fn url(&self, path: &str) -> Url {
        let mut url = self.endpoint.clone();
        url.set_path(path);
        url.query_pairs_mut()
            .append_pair("api-version", API_VERSION);
        url
    }

    /// Sends one request under the retry policy. PUT, PATCH and DELETE of ARM
    /// are idempotent (create-or-update with the same body).
    pub(crate) async fn call(
        &self,
        operation: &'static str,
        method: Method,
        url: &Url,
        body: Option<&Value>,
    ) -> ArmResult<Answer> {
        let a = self
            .rest
            .call(operation, method, url, body, Idempotency::Idempotent)
            .await?;
        let operation = a
            .async_operation
            .map(Operation::AsyncOperation)
            .or_else(|| a.location.map(Operation::Location))
            .unwrap_or_else(|| Operation::Resource(url.to_string()));
        Ok(Answer {
            status: a.status,
            body: a.body,
            operation,
            retry_after: a.retry_after,
        })
    }

    /// Asks where a long-running operation stands.
    pub(crate) async fn poll(&self, op: &mut Operation) -> ArmResult<OperationState> {
        let parse = |u: &str| {
            Url::parse(u)
                .map_err(|e| ServiceError::other("arm_poll", u, ErrorClass::Invalid, e.to_string()))
        };
        match op {
            Operation::AsyncOperation(u) => {
                let a = self.call("arm_poll", Method::GET, &parse(u)?, None).await?;
                Ok(match a.body["status"].as_str().unwrap_or("InProgress") {
                    "Succeeded" => OperationState::Succeeded,
                    s if s == "Failed" || cancelled(s) => {
                        OperationState::Failed(format!("{s}: {}", error_text(&a.body)))
                    }
                    _ => OperationState::Running(a.retry_after),
                })
            }
            Operation::Location(u) => {
                let a = self.call("arm_poll", Method::GET, &parse(u)?, None).await?;
                // A 202 may name a new Location: follow that one from now on.
                if let Operation::Location(next) = &a.operation {
                    if next != u {
                        *u = next.clone();
                    }
                }
                Ok(if a.status == 202 {
                    OperationState::Running(a.retry_after)
                } else {
                    OperationState::Succeeded
                })
            }
            Operation::Resource(u) => {
                match self.call("arm_poll", Method::GET, &parse(u)?, None).await {
                    Ok(a) => Ok(provisioning(&a.body, a.retry_after)),
                    // A deleted resource is what a delete wanted.
                    Err(e) if e.class == ErrorClass::NotFound => Ok(OperationState::Succeeded),
                    Err(e) => Err(e),
                }
            }
        }
    }
}

/// Whether a 409 says another operation on the resource is under way (the
/// one conflict that passes by waiting).
fn operation_in_progress(code: Option<&str>, detail: &str) -> bool {
    matches!(
        code,
        Some("AnotherOperationInProgress" | "OperationNotAllowedWhileInProgress")
    ) || detail.to_ascii_lowercase().contains("in progress")
}

/// Whether ARM's status says the operation was cancelled (both spellings
/// are seen).
fn cancelled(status: &str) -> bool {
    status.eq_ignore_ascii_case("Canceled") || status.eq_ignore_ascii_case("Cancelled")
}

/// The state a resource's `provisioningState` says.
pub(crate) fn provisioning(body: &Value, retry_after: Option<Duration>) -> OperationState {
    match body["properties"]["provisioningState"].as_str() {
        Some("Succeeded") | None => OperationState::Succeeded,
        Some(s) if s == "Failed" || cancelled(s) => OperationState::Failed(format!(
            "provisioning {}",
            body["properties"]["provisioningState"]
                .as_str()
                .unwrap_or_default()
                .to_lowercase()
        )),
        Some(_) => OperationState::Running(retry_after),
    }
}

/// ARM's `error.code: error.message` (and the first detail), or the body.
pub(crate) fn error_text(body: &Value) -> String {
    let e = &body["error"];
    let mut text = match (e["code"].as_str(), e["message"].as_str()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (None, Some(m)) => m.to_owned(),
        (Some(c), None) => c.to_owned(),
        (None, None) => body.to_string(),
    };
    if let Some(d) = e["details"].get(0) {
        if let (Some(c), Some(m)) = (d["code"].as_str(), d["message"].as_str()) {
            text.push_str(&format!(" ({c}: {m})"));
        }
    }
    text
}

/// An ARM failure, classified for the retry policy and told in words a person
/// can act on: which role is missing, which quota ran out.
pub(crate) fn arm_error(
    operation: &'static str,
    target: &str,
    status: u16,
    body: &Value,
    retry_after: Option<Duration>,
) -> ServiceError {
    let code = body["error"]["code"].as_str();
    let mut e = ServiceError::http(operation, target, status, code);
    let detail = error_text(body);
    let in_progress = operation_in_progress(code, &detail);
    e.message = match (status, code) {
        (403, Some("AuthorizationFailed" | "LinkedAuthorizationFailed")) => format!(
            "{detail}; assign the daemon's identity \"Compute Gallery Artifacts Publisher\" (or Contributor) on the gallery's resource group, and Contributor on the staging storage accounts (the version reads its VHD by storageAccountId)"
        ),
        (401, _) => format!("{detail}; the Entra token was refused: check gallery.credential and the identity's tenant"),
        _ if detail.to_ascii_lowercase().contains("quota") => format!(
            "quota exceeded: {detail}; ask for an increase of that quota for the subscription and region (Azure portal, Usage + quotas), or lower gallery.min_replicas / nodes_per_replica's replica count"
        ),
        _ => detail,
    };
    if status == 409 && in_progress {
        // Another operation on the same resource is still running: wait for it.
        // Any other 409 (a property that cannot change, a name in use) is final,
        // with ARM's words.
        e.class = ErrorClass::Throttled;
    }
    e.retry_after = retry_after;
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn errors_name_the_role_and_the_quota() {
        let body = json!({"error": {"code": "AuthorizationFailed", "message": "The client 'x' does not have authorization to perform action 'Microsoft.Compute/galleries/images/versions/write' over scope '/subscriptions/s/resourceGroups/images'"}});
        let e = arm_error("arm_put", "/v", 403, &body, None);
        assert_eq!(e.class, ErrorClass::Denied);
        assert!(
            e.message.contains("Compute Gallery Artifacts Publisher"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("/resourceGroups/images"),
            "{}",
            e.message
        );
        let body = json!({"error": {"code": "OperationNotAllowed", "message": "Operation could not be completed as it results in exceeding approved GalleryImageVersionReplicas quota."}});
        let e = arm_error("arm_put", "/v", 400, &body, None);
        assert_eq!(e.class, ErrorClass::Invalid);
        assert!(
            e.message.starts_with("quota exceeded: OperationNotAllowed"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("GalleryImageVersionReplicas"),
            "{}",
            e.message
        );
    }

    #[test]
    fn throttling_and_conflicts_are_retried_with_retry_after() {
        let body = json!({"error": {"code": "TooManyRequests", "message": "slow down"}});
        let e = arm_error("arm_get", "/v", 429, &body, Some(Duration::from_secs(7)));
        assert!(e.class.is_retryable());
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        let body =
            json!({"error": {"code": "Conflict", "message": "another operation is in progress"}});
        assert!(arm_error("arm_put", "/v", 409, &body, None)
            .class
            .is_retryable());
        assert!(!arm_error("arm_put", "/v", 400, &body, None)
            .class
            .is_retryable());
    }

    /// Only "another operation is in progress" passes by waiting; any other
    /// 409 is final and keeps ARM's words; both spellings of cancelled fail.
    #[test]
    fn only_an_operation_in_progress_is_waited_for() {
        let busy = json!({"error": {"code": "Conflict", "message": "Another operation on this or dependent resource is in progress."}});
        assert!(arm_error("arm_patch", "/v", 409, &busy, None)
            .class
            .is_retryable());
        let coded = json!({"error": {"code": "AnotherOperationInProgress", "message": "x"}});
        assert!(arm_error("arm_patch", "/v", 409, &coded, None)
            .class
            .is_retryable());
        let change = json!({"error": {"code": "PropertyChangeNotAllowed", "message": "Changing property 'storageProfile.osDiskImage.source' is not allowed."}});
        let e = arm_error("arm_patch", "/v", 409, &change, None);
        assert!(!e.class.is_retryable());
        assert!(
            e.message
                .contains("PropertyChangeNotAllowed: Changing property"),
            "{}",
            e.message
        );
        for spelling in ["Canceled", "Cancelled"] {
            let body = json!({"properties": {"provisioningState": spelling}});
            assert!(
                matches!(provisioning(&body, None), OperationState::Failed(_)),
                "{spelling}"
            );
        }
        let migrating = json!({"properties": {"provisioningState": "Migrating"}});
        assert_eq!(
            provisioning(&migrating, None),
            OperationState::Running(None)
        );
    }

    #[test]
    fn provisioning_states() {
        let s = |v: &str| json!({"properties": {"provisioningState": v}});
        assert_eq!(
            provisioning(&s("Succeeded"), None),
            OperationState::Succeeded
        );
        assert_eq!(
            provisioning(&s("Creating"), None),
            OperationState::Running(None)
        );
        assert_eq!(
            provisioning(&s("Updating"), Some(Duration::from_secs(3))),
            OperationState::Running(Some(Duration::from_secs(3)))
        );
        assert!(matches!(
            provisioning(&s("Failed"), None),
            OperationState::Failed(_)
        ));
    }

    #[test]
    fn the_scope_is_the_endpoints_and_loopback_is_the_public_clouds() {
        let u = |s: &str| Url::parse(s).unwrap();
        assert_eq!(
            scope_for(&u("https://management.azure.com")),
            "https://management.azure.com/.default"
        );
        assert_eq!(
            scope_for(&u("https://management.usgovcloudapi.net/")),
            "https://management.usgovcloudapi.net/.default"
        );
        assert_eq!(
            scope_for(&u("https://127.0.0.1:8443")),
            "https://management.azure.com/.default"
        );
    }
}
