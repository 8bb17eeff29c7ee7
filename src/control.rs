//! The control plane: the clients, stores and queues built from validated
//! settings, and the operations the CLI and the HTTP API share (submit, retire,
//! cancel). The daemon on top of it is in [`crate::daemon`].

use crate::config::ValidatedSettings;
use crate::handoff::HandoffSinks;
use crate::job::{JobError, JobSpec};
use crate::metrics::Metrics;
use crate::queue::{AzureQueue, InstrumentedQueue, MessageQueue};
use crate::state::{JobDocument, StateError, StateStore};
use crate::{azure::limits::AccountLimits, engine::Engine};
use crate::{
    azure::{outbound::Outbound, retry::RetryPolicy, transport::shared_transport, ServiceError},
    storage::{azure::AzureStore, instrumented::Instrumented, BlobStore},
};
use std::sync::Arc;

/// The control plane: storage, queues and state of one deployment.
#[derive(Debug, Clone)]
pub struct Control {
    /// Validated settings.
    pub settings: Arc<ValidatedSettings>,
    /// Metrics of this process.
    pub metrics: Metrics,
    /// Request rates and adaptive copy caps per account.
    pub limits: Arc<AccountLimits>,
    /// Blob storage (rate-limited, retried, counted).
    pub store: Arc<dyn BlobStore>,
    /// Job documents.
    pub state: StateStore,
    /// The outbound call path (limits, timeouts, retries, metrics) of every call.
    pub outbound: Outbound,
    /// Intake queue.
    pub intake: Arc<dyn MessageQueue>,
    /// Poison queue.
    pub poison: Arc<dyn MessageQueue>,
    /// Hand-off queue.
    pub handoff: Arc<dyn MessageQueue>,
}

/// Submitting a job failed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The job is invalid.
    #[error("{0}")]
    Invalid(#[from] JobError),
    /// Storage failed.
    #[error("cannot submit: {0}")]
    Storage(#[from] ServiceError),
    /// State failed.
    #[error("cannot submit: {0}")]
    State(#[from] StateError),
}

/// A submitted job.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Submitted {
    /// Its id.
    pub job_id: String,
    /// False when a job with this id existed already (nothing new was queued).
    pub created: bool,
}

impl Control {
    /// Azure (or Azurite) clients for every account.
    pub fn azure(settings: Arc<ValidatedSettings>, metrics: Metrics) -> Result<Self, ServiceError> {
        let transport = shared_transport(&settings.accounts, settings.connect_timeout())?;
        let raw: Arc<dyn BlobStore> = Arc::new(AzureStore::new(
            &settings.accounts,
            &transport,
            settings.retry_policy(),
        ));
        let control = settings
            .account(&settings.control.account)
            .expect("validated: the control account is configured");
        let q = |name: &str| -> Result<Arc<dyn MessageQueue>, ServiceError> {
            Ok(Arc::new(AzureQueue::new(control, name, &transport)?))
        };
        let intake = q(&settings.control.intake_queue)?;
        let poison = q(&settings.control.poison_queue)?;
        let handoff = q(&settings.control.handoff_queue)?;
        let retry = settings.retry_policy();
        Ok(Self::with_retry(
            settings, metrics, raw, intake, poison, handoff, retry,
        ))
    }

    /// Any store and queues (the in-memory ones in tests).
    pub fn from_parts(
        settings: Arc<ValidatedSettings>,
        metrics: Metrics,
        raw_store: Arc<dyn BlobStore>,
        intake: Arc<dyn MessageQueue>,
        poison: Arc<dyn MessageQueue>,
        handoff: Arc<dyn MessageQueue>,
    ) -> Self {
        let retry = settings.retry_policy();
        Self::with_retry(settings, metrics, raw_store, intake, poison, handoff, retry)
    }

    /// Like [`Control::from_parts`] with a chosen request retry policy (a seeded
    /// jitter makes simulations repeatable).
    pub fn with_retry(
        settings: Arc<ValidatedSettings>,
        metrics: Metrics,
        raw_store: Arc<dyn BlobStore>,
        intake: Arc<dyn MessageQueue>,
        poison: Arc<dyn MessageQueue>,
        handoff: Arc<dyn MessageQueue>,
        retry: RetryPolicy,
    ) -> Self {
        let limits = Arc::new(AccountLimits::new(settings.accounts.iter().map(|a| {
            (
                a.name.clone(),
                a.max_requests_per_second,
                a.max_concurrent_copies,
            )
        })));
        metrics.export_known_series(settings.accounts.iter().map(|a| a.name.as_str()));
        let outbound = Outbound::new(limits.clone(), metrics.clone(), retry);
        let store: Arc<dyn BlobStore> = Arc::new(Instrumented::new(raw_store, outbound.clone()));
        let control = &settings.control.account;
        let wrap = |q: Arc<dyn MessageQueue>| -> Arc<dyn MessageQueue> {
            Arc::new(InstrumentedQueue::new(q, control, outbound.clone()))
        };
        let (intake, poison, handoff) = (wrap(intake), wrap(poison), wrap(handoff));
        let state = StateStore::new(
            store.clone(),
            &settings.control.account,
            &settings.control.state_container,
        );
        Self {
            settings,
            metrics,
            limits,
            store,
            state,
            outbound,
            intake,
            poison,
            handoff,
        }
    }

    /// Creates the queues and the state container if they are missing.
    pub async fn ensure(&self) -> Result<(), StateError> {
        for q in [&self.intake, &self.poison, &self.handoff] {
            q.ensure().await?;
        }
        self.state.ensure().await
    }

    /// Checks a job and puts it on the intake queue. A job id seen before queues
    /// nothing new: resubmitting never makes a second set of copies.
    pub async fn submit(&self, spec: JobSpec) -> Result<Submitted, SubmitError> {
        let job = spec.validate(&self.settings)?;
        if self.state.load(job.id.as_str()).await?.is_some() {
            return Ok(Submitted {
                job_id: job.id.to_string(),
                created: false,
            });
        }
        // Queue first, then the document: a crash between the two leaves a message
        // the worker completes, never a document nobody will run.
        let text = serde_json::to_string(&job.spec).expect("job spec serialises");
        self.intake.send(&text).await?;
        match self
            .state
            .create(&JobDocument::replicate(job.id.clone(), job.spec.clone()))
            .await
        {
            Ok(_) | Err(StateError::Exists(_)) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Submitted {
            job_id: job.id.to_string(),
            created: true,
        })
    }

    /// Queues the retirement of a pool's image sets (a job like any other).
    pub async fn submit_retire(
        &self,
        pool: &str,
        job_id: Option<String>,
    ) -> Result<Submitted, SubmitError> {
        let spec = crate::job::RetireSpec {
            job_id,
            retire_pool: pool.to_owned(),
        };
        let (id, pool) = spec.validate()?;
        if self.state.load(id.as_str()).await?.is_some() {
            return Ok(Submitted {
                job_id: id.to_string(),
                created: false,
            });
        }
        let text = serde_json::to_string(&crate::job::RetireSpec {
            job_id: Some(id.to_string()),
            retire_pool: pool.clone(),
        })
        .expect("retire spec serialises");
        self.intake.send(&text).await?;
        match self
            .state
            .create(&JobDocument::retire(id.clone(), &pool))
            .await
        {
            Ok(_) | Err(StateError::Exists(_)) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Submitted {
            job_id: id.to_string(),
            created: true,
        })
    }

    /// Asks for a job to be cancelled; the instance running it aborts its copies.
    pub async fn cancel(&self, id: &str) -> Result<JobDocument, StateError> {
        self.state
            .update(id, |d| {
                if d.state().is_terminal() || d.cancel_requested {
                    return false;
                }
                d.cancel_requested = true;
                true
            })
            .await
    }

    /// The engine for this control plane.
    pub fn engine(&self) -> Engine {
        let handoff = HandoffSinks {
            queue: self.handoff.clone(),
            dir: self.settings.handoff_dir.clone(),
            webhook: self.settings.handoff_webhook.clone(),
            http: reqwest::Client::builder()
                .connect_timeout(self.settings.connect_timeout())
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("a plain HTTP client builds"),
            retry: self.outbound.retry().clone(),
            encoding: self.settings.handoff.queue_encoding,
            state: self.state.clone(),
        };
        Engine::new(
            self.store.clone(),
            self.state.clone(),
            handoff,
            self.metrics.clone(),
            self.limits.clone(),
            self.settings.clone(),
        )
    }
}
