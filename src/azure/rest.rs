//! JSON over HTTPS with an Entra bearer token, for the services the SDK
//! crates do not cover here (Resource Manager, the Batch data plane): a token
//! for the client's scope on every attempt, each attempt under the retry
//! policy's timeout, and failures classified by the service's own error
//! mapping so 429, 5xx and Retry-After go through the one retry policy.

use super::retry::{Idempotency, RetryPolicy};
use super::{ErrorClass, ServiceError, TransportFailure};
use azure_core::credentials::TokenCredential;
use reqwest::Method;
use serde_json::Value;
use std::{sync::Arc, time::Duration};
use url::Url;

/// One answer of a service.
#[derive(Debug, Clone)]
pub(crate) struct RestAnswer {
    /// HTTP status.
    pub(crate) status: u16,
    /// The JSON body (`Null` when empty).
    pub(crate) body: Value,
    /// Retry-After, when given.
    pub(crate) retry_after: Option<Duration>,
    /// `Azure-AsyncOperation`, when given.
    pub(crate) async_operation: Option<String>,
    /// `Location`, when given.
    pub(crate) location: Option<String>,
}

/// How a service's failure answer becomes a classified error: the operation,
/// the target, the status, the body and Retry-After.
pub(crate) type ErrorMapper = fn(&'static str, &str, u16, &Value, Option<Duration>) -> ServiceError;

/// A client of one service with one token scope.
pub(crate) struct RestClient {
    http: reqwest::Client,
    credential: Arc<dyn TokenCredential>,
    scope: String,
    retry: RetryPolicy,
    map_error: ErrorMapper,
    /// Extra headers every request carries (e.g. Batch's content type).
    content_type: &'static str,
}

impl std::fmt::Debug for RestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestClient")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// What a REST client is built from.
pub(crate) struct RestSettings<'a> {
    /// Extra CA certificates (PEM) to trust, and the key that named them.
    pub(crate) ca_pem: Option<(&'a [u8], &'static str)>,
    /// The credential.
    pub(crate) credential: Arc<dyn TokenCredential>,
    /// The token scope, `<resource>/.default`.
    pub(crate) scope: String,
    /// The retry policy.
    pub(crate) retry: RetryPolicy,
    /// How long a connection may take.
    pub(crate) connect_timeout: Duration,
    /// The service's error mapping.
    pub(crate) map_error: ErrorMapper,
    /// The request body's content type.
    pub(crate) content_type: &'static str,
}

impl RestClient {
    /// A client with the given timeouts, extra CA and error mapping.
    pub(crate) fn new(s: RestSettings<'_>) -> Result<Self, ServiceError> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(s.connect_timeout);
        if let Some((pem, key)) = s.ca_pem {
            let bad = |e: reqwest::Error| ServiceError::other("tls", key, ErrorClass::Invalid, e);
            for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(bad)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| ServiceError::other("tls", "http client", ErrorClass::Invalid, e))?;
        Ok(Self {
            http,
            credential: s.credential,
            scope: s.scope,
            retry: s.retry,
            map_error: s.map_error,
            content_type: s.content_type,
        })
    }

    /// Sends one request under the retry policy.
    pub(crate) async fn call(
        &self,
        operation: &'static str,
        method: Method,
        url: &Url,
        body: Option<&Value>,
        idempotency: Idempotency,
    ) -> Result<RestAnswer, ServiceError> {
        let shown = url.path().to_owned();
        self.retry
            .run(
                idempotency,
                |e| tracing::debug!(operation, target = %shown, error = %e.message, "retrying a request"),
                || {
                    self.retry.timed(
                        operation,
                        &shown,
                        self.attempt(operation, method.clone(), url, body),
                    )
                },
            )
            .await
    }

    async fn attempt(
        &self,
        operation: &'static str,
        method: Method,
        url: &Url,
        body: Option<&Value>,
    ) -> Result<RestAnswer, ServiceError> {
        let target = url.path();
        let token = self
            .credential
            .get_token(&[self.scope.as_str()], None)
            .await
            .map_err(|e| {
                ServiceError::transport(
                    operation,
                    target,
                    TransportFailure::Connect,
                    format!("cannot get an Entra token for {}: {e}", self.scope),
                )
            })?;
        let mut request = self
            .http
            .request(method, url.clone())
            .bearer_auth(token.token.secret());
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, self.content_type)
                .body(body.to_string());
        }
        let rsp = request.send().await.map_err(|e| {
            let failure = if e.is_connect() {
                TransportFailure::Connect
            } else {
                TransportFailure::Broken
            };
            ServiceError::transport(operation, target, failure, e.without_url())
        })?;
        let status = rsp.status().as_u16();
        let header = |name: &str| {
            rsp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let retry_after = header("retry-after")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let async_operation = header("azure-asyncoperation");
        let location = header("location");
        let text = rsp
            .text()
            .await
            .map_err(|e| ServiceError::transport(operation, target, TransportFailure::Broken, e))?;
        let body = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if (200..300).contains(&status) {
            return Ok(RestAnswer {
                status,
                body,
                retry_after,
                async_operation,
                location,
            });
        }
        Err((self.map_error)(
            operation,
            target,
            status,
            &body,
            retry_after,
        ))
    }
}
