//! A queue in memory with the visibility and pop-receipt rules of Azure Storage
//! queues, for unit tests and simulations (feature `testkit`).

use crate::azure::ServiceError;
use crate::queue::{MessageQueue, QueueResult, ReceivedMessage};
use async_trait::async_trait;
use std::{collections::VecDeque, sync::Mutex, time::Duration};
use time::OffsetDateTime;

#[derive(Debug, Clone)]
struct Stored {
    id: String,
    pop_receipt: String,
    dequeue_count: u32,
    text: String,
    visible_at: tokio::time::Instant,
    inserted: OffsetDateTime,
}

/// A queue in memory, with visibility timeouts on tokio's clock.
#[derive(Debug)]
pub struct MemoryQueue {
    name: String,
    messages: Mutex<VecDeque<Stored>>,
}

impl MemoryQueue {
    /// An empty queue.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            messages: Mutex::new(VecDeque::new()),
        }
    }

    /// Texts of every message, visible or not (for tests).
    pub(crate) fn texts(&self) -> Vec<String> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.text.clone())
            .collect()
    }
}

#[async_trait]
impl MessageQueue for MemoryQueue {
    fn name(&self) -> &str {
        &self.name
    }

    async fn ensure(&self) -> QueueResult<()> {
        Ok(())
    }

    async fn send(&self, text: &str) -> QueueResult<()> {
        self.messages.lock().unwrap().push_back(Stored {
            id: uuid::Uuid::new_v4().to_string(),
            pop_receipt: String::new(),
            dequeue_count: 0,
            text: text.to_owned(),
            visible_at: tokio::time::Instant::now(),
            inserted: OffsetDateTime::now_utc(),
        });
        Ok(())
    }

    async fn receive(&self, max: u32, visibility: Duration) -> QueueResult<Vec<ReceivedMessage>> {
        let now = tokio::time::Instant::now();
        let mut out = Vec::new();
        for m in self.messages.lock().unwrap().iter_mut() {
            if out.len() as u32 >= max {
                break;
            }
            if m.visible_at <= now {
                m.dequeue_count += 1;
                m.pop_receipt = uuid::Uuid::new_v4().to_string();
                m.visible_at = now + visibility;
                out.push(ReceivedMessage {
                    id: m.id.clone(),
                    pop_receipt: m.pop_receipt.clone(),
                    dequeue_count: m.dequeue_count,
                    text: m.text.clone(),
                    inserted: Some(m.inserted),
                });
            }
        }
        Ok(out)
    }

    async fn renew(
        &self,
        id: &str,
        pop_receipt: &str,
        visibility: Duration,
    ) -> QueueResult<String> {
        let mut q = self.messages.lock().unwrap();
        let m = q
            .iter_mut()
            .find(|m| m.id == id && m.pop_receipt == pop_receipt)
            .ok_or_else(|| {
                ServiceError::http("update_message", &self.name, 404, Some("MessageNotFound"))
            })?;
        m.pop_receipt = uuid::Uuid::new_v4().to_string();
        m.visible_at = tokio::time::Instant::now() + visibility;
        Ok(m.pop_receipt.clone())
    }

    async fn approximate_count(&self) -> QueueResult<u64> {
        Ok(self.messages.lock().unwrap().len() as u64)
    }

    async fn delete(&self, id: &str, pop_receipt: &str) -> QueueResult<()> {
        let mut q = self.messages.lock().unwrap();
        let before = q.len();
        q.retain(|m| !(m.id == id && m.pop_receipt == pop_receipt));
        if q.len() == before {
            return Err(ServiceError::http(
                "delete_message",
                &self.name,
                404,
                Some("MessageNotFound"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn visibility_and_receipts() {
        let q = MemoryQueue::new("q");
        q.send("a").await.unwrap();
        let got = q.receive(5, Duration::from_secs(10)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert!(q
            .receive(5, Duration::from_secs(10))
            .await
            .unwrap()
            .is_empty());
        let new_receipt = q
            .renew(&got[0].id, &got[0].pop_receipt, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(
            q.delete(&got[0].id, &got[0].pop_receipt).await.is_err(),
            "old receipt is stale"
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        let again = q.receive(5, Duration::from_secs(10)).await.unwrap();
        assert_eq!(again[0].dequeue_count, 2);
        assert!(
            q.delete(&got[0].id, &new_receipt).await.is_err(),
            "receipt changed on re-take"
        );
        q.delete(&again[0].id, &again[0].pop_receipt).await.unwrap();
        assert!(q.texts().is_empty());
    }
}
