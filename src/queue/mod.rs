//! Storage queues behind one narrow trait: the intake, poison and hand-off queues.
//!
//! `AzureQueue` uses the GA `azure_storage_queue` client; the test kit's
//! `MemoryQueue` keeps messages in memory with the same visibility and
//! pop-receipt rules;
//! `InstrumentedQueue` wraps either in the outbound call path every storage call
//! takes (rate limit, timeout, retries, metrics).

use crate::azure::account::{AccountConfig, AccountCredential};
use crate::azure::{
    map_sdk_error, outbound::Outbound, retry::Idempotency, ErrorClass, ServiceError,
};
use async_trait::async_trait;
use azure_core::http::{headers::HeaderName, Transport};
use azure_storage_queue::{
    models::{QueueClientReceiveMessagesOptions, QueueMessage},
    QueueClient, QueueClientOptions,
};
use std::{fmt, sync::Arc, time::Duration};

use time::OffsetDateTime;

/// How queue message text is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueEncoding {
    /// The JSON as is (`az storage message put`, the Python SDK).
    Text,
    /// Base64 of the JSON (Azure Functions queue triggers, the Portal).
    Base64,
}

impl QueueEncoding {
    /// The message text for `json`.
    pub fn encode(self, json: &str) -> String {
        use base64::{engine::general_purpose::STANDARD, Engine as _};
        match self {
            QueueEncoding::Text => json.to_owned(),
            QueueEncoding::Base64 => STANDARD.encode(json),
        }
    }
}

/// Result of a queue call.
pub(crate) type QueueResult<T> = Result<T, ServiceError>;

/// A message taken from a queue, invisible to others until its lease lapses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// Message id.
    pub id: String,
    /// The receipt needed to renew or delete it (changes on every renewal).
    pub pop_receipt: String,
    /// How many times it has been taken, this time included.
    pub dequeue_count: u32,
    /// The message text.
    pub text: String,
    /// When it was first enqueued.
    pub inserted: Option<OffsetDateTime>,
}

/// Everything the daemon asks of a queue. A stale pop receipt fails with
/// [`ServiceError::is_lost_message`] true.
#[async_trait]
pub trait MessageQueue: Send + Sync + fmt::Debug {
    /// Queue name.
    fn name(&self) -> &str;
    /// Creates the queue if it does not exist.
    async fn ensure(&self) -> QueueResult<()>;
    /// Appends a message (text up to 64 KiB), never expiring.
    async fn send(&self, text: &str) -> QueueResult<()>;
    /// Takes up to `max` messages, hiding them for `visibility`.
    async fn receive(&self, max: u32, visibility: Duration) -> QueueResult<Vec<ReceivedMessage>>;
    /// Extends a taken message's invisibility; returns the new pop receipt.
    async fn renew(&self, id: &str, pop_receipt: &str, visibility: Duration)
        -> QueueResult<String>;
    /// Deletes a taken message.
    async fn delete(&self, id: &str, pop_receipt: &str) -> QueueResult<()>;
    /// Approximately how many messages the queue holds, taken ones included.
    async fn approximate_count(&self) -> QueueResult<u64>;
}

/// An Azure Storage queue.
pub(crate) struct AzureQueue {
    name: String,
    client: QueueClient,
}

impl fmt::Debug for AzureQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureQueue")
            .field("name", &self.name)
            .finish()
    }
}

impl AzureQueue {
    /// A client for queue `name` of `account`.
    pub(crate) fn new(
        account: &AccountConfig,
        name: &str,
        transport: &Transport,
    ) -> QueueResult<Self> {
        let mut url = account.queue_endpoint.clone();
        url.path_segments_mut()
            .expect("endpoints are validated as base URLs")
            .pop_if_empty()
            .push(name);
        let mut options = QueueClientOptions {
            client_options: crate::azure::transport::client_options(transport, account),
            ..Default::default()
        };
        if let Some(v) = crate::azure::transport::service_version(account) {
            options.version = v;
        }
        let token = match &account.credential {
            AccountCredential::Entra(t) => Some(t.clone()),
            AccountCredential::SharedKey(_) => None,
        };
        let client = QueueClient::new(url, token, Some(options))
            .map_err(|e| map_sdk_error("queue_client", name, e))?;
        Ok(Self {
            name: name.to_owned(),
            client,
        })
    }
}

fn secs(d: Duration) -> i32 {
    d.as_secs().clamp(0, 7 * 24 * 3600) as i32
}

#[async_trait]
impl MessageQueue for AzureQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn ensure(&self) -> QueueResult<()> {
        match self.client.create(None).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let err = map_sdk_error("create_queue", &self.name, e);
                if err.class == ErrorClass::Conflict {
                    Ok(())
                } else {
                    Err(err)
                }
            }
        }
    }

    async fn send(&self, text: &str) -> QueueResult<()> {
        const OP: &str = "send_message";
        if text.len() > 64 * 1024 {
            // Checked before sending, with the code the service answers it with.
            let mut e = ServiceError::other(
                OP,
                &self.name,
                ErrorClass::Invalid,
                format!(
                    "message of {} bytes exceeds the 64 KiB queue limit",
                    text.len()
                ),
            );
            e.code = Some("MessageTooLarge".to_owned());
            return Err(e);
        }
        let message = QueueMessage {
            message_text: Some(text.to_owned()),
        };
        let content = message
            .try_into()
            .map_err(|e| map_sdk_error(OP, &self.name, e))?;
        let options = azure_storage_queue::models::QueueClientSendMessageOptions {
            message_time_to_live: Some(-1),
            ..Default::default()
        };
        self.client
            .send_message(content, Some(options))
            .await
            .map(|_| ())
            .map_err(|e| map_sdk_error(OP, &self.name, e))
    }

    async fn receive(&self, max: u32, visibility: Duration) -> QueueResult<Vec<ReceivedMessage>> {
        const OP: &str = "receive_messages";
        let options = QueueClientReceiveMessagesOptions {
            number_of_messages: Some(max.clamp(1, 32) as i32),
            visibility_timeout: Some(secs(visibility).max(1)),
            ..Default::default()
        };
        let rsp = self
            .client
            .receive_messages(Some(options))
            .await
            .map_err(|e| map_sdk_error(OP, &self.name, e))?;
        let model = rsp
            .into_model()
            .map_err(|e| map_sdk_error(OP, &self.name, e))?;
        Ok(model
            .items
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                Some(ReceivedMessage {
                    id: m.message_id?,
                    pop_receipt: m.pop_receipt?,
                    dequeue_count: m.dequeue_count.unwrap_or(1).max(0) as u32,
                    text: m.message_text.unwrap_or_default(),
                    inserted: m.insertion_time,
                })
            })
            .collect())
    }

    async fn renew(
        &self,
        id: &str,
        pop_receipt: &str,
        visibility: Duration,
    ) -> QueueResult<String> {
        const OP: &str = "update_message";
        let rsp = self
            .client
            .update_message(id, pop_receipt, secs(visibility), None)
            .await
            .map_err(|e| map_sdk_error(OP, &self.name, e))?;
        rsp.headers()
            .get_optional_str(&HeaderName::from_static("x-ms-popreceipt"))
            .map(str::to_owned)
            .ok_or_else(|| {
                ServiceError::other(
                    OP,
                    &self.name,
                    ErrorClass::Transient,
                    "no x-ms-popreceipt in answer",
                )
            })
    }

    async fn delete(&self, id: &str, pop_receipt: &str) -> QueueResult<()> {
        self.client
            .delete_message(id, pop_receipt, None)
            .await
            .map(|_| ())
            .map_err(|e| map_sdk_error("delete_message", &self.name, e))
    }

    async fn approximate_count(&self) -> QueueResult<u64> {
        use azure_storage_queue::models::QueueClientGetPropertiesResultHeaders;
        const OP: &str = "get_queue_properties";
        let rsp = self
            .client
            .get_properties(None)
            .await
            .map_err(|e| map_sdk_error(OP, &self.name, e))?;
        Ok(rsp
            .approximate_messages_count()
            .map_err(|e| map_sdk_error(OP, &self.name, e))?
            .unwrap_or(0)
            .max(0) as u64)
    }
}

/// A queue whose every call takes the outbound path of its account: a request
/// token, the attempt timeout, the metrics and the one retry policy.
#[derive(Debug)]
pub(crate) struct InstrumentedQueue {
    inner: Arc<dyn MessageQueue>,
    account: String,
    out: Outbound,
}

impl InstrumentedQueue {
    /// Wraps `inner`, a queue of `account`.
    pub(crate) fn new(inner: Arc<dyn MessageQueue>, account: &str, out: Outbound) -> Self {
        Self {
            inner,
            account: account.to_owned(),
            out,
        }
    }
}

#[async_trait]
impl MessageQueue for InstrumentedQueue {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn ensure(&self) -> QueueResult<()> {
        self.out
            .call(
                &self.account,
                "create_queue",
                Idempotency::Idempotent,
                || self.inner.ensure(),
            )
            .await
    }

    /// Sent again after a lost answer: delivery is at least once, and every
    /// reader dedupes (the intake by job id, the pool-creation stage by job id).
    async fn send(&self, text: &str) -> QueueResult<()> {
        self.out
            .call(
                &self.account,
                "send_message",
                Idempotency::Idempotent,
                || self.inner.send(text),
            )
            .await
    }

    async fn receive(&self, max: u32, visibility: Duration) -> QueueResult<Vec<ReceivedMessage>> {
        self.out
            .call(
                &self.account,
                "receive_messages",
                Idempotency::Idempotent,
                || self.inner.receive(max, visibility),
            )
            .await
    }

    /// Not sent again after a lost answer: the service would have changed the
    /// pop receipt, so a second try could only fail as "lost".
    async fn renew(
        &self,
        id: &str,
        pop_receipt: &str,
        visibility: Duration,
    ) -> QueueResult<String> {
        self.out
            .call(
                &self.account,
                "update_message",
                Idempotency::NotIdempotent,
                || self.inner.renew(id, pop_receipt, visibility),
            )
            .await
    }

    async fn delete(&self, id: &str, pop_receipt: &str) -> QueueResult<()> {
        self.out
            .call(
                &self.account,
                "delete_message",
                Idempotency::Idempotent,
                || self.inner.delete(id, pop_receipt),
            )
            .await
    }

    async fn approximate_count(&self) -> QueueResult<u64> {
        self.out
            .call(
                &self.account,
                "get_queue_properties",
                Idempotency::Idempotent,
                || self.inner.approximate_count(),
            )
            .await
    }
}
