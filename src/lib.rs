//! vhd-replicator: turns one custom VHD into the many identical copies an Azure
//! Batch pool needs, with server-side copies across storage accounts.
//!
//! The pipeline, module by module:
//!
//! ```text
//!  cli / api ──▶ intake queue ──▶ plan ──▶ engine ──▶ verify ──▶ handoff
//!                 (intake)        (plan)   (engine)   (engine)   (handoff)
//!                 job state: one JSON document per job (state), ETag-guarded
//! ```
//!
//! - [`config`]: settings from TOML and `VHDREP__SECTION__KEY`, validated with the key named.
//! - [`job`]: the submitted job, its parsing and validation.
//! - [`placement`]: which account each replica goes to, within capacity (pure).
//! - [`plan`]: replicas, names, metadata (pure).
//! - [`engine`]: runs a job: snapshot, copies under limits, polling, verification, hand-off.
//! - [`storage`]: the `BlobStore` trait; Azure, in-memory and instrumented stores; auth.
//! - [`queue`]: the `MessageQueue` trait; Azure and in-memory queues.
//! - [`intake`]: the queue consumer: leases, poison queue.
//! - [`state`]: job documents with ETag concurrency.
//! - [`gc`]: orphaned replicas and snapshots, found and removed.
//! - [`handoff`]: the pool-creation hand-off and its sinks.
//! - [`api`]: HTTP routes, metrics, health; [`pages`]: the status pages (HTML).
//! - [`metrics`]: every metric in one place.
//! - [`vhd`]: the fixed-VHD footer.
//! - [`estimate`]: throughput and ETA from observed progress (pure).
//! - [`views`]: the JSON views of jobs and pools the API and the CLI share.
//! - [`gallery`]: Azure Compute Gallery image versions through Azure Resource Manager.
//! - `fake_arm` (feature `testkit`): a fake Azure Resource Manager for the gallery tests.
//! - `proxy` (feature `testkit`): an Azure behaviour proxy in front of Azurite, for tests.
//! - `simulation` (feature `testkit`): whole-daemon runs on the simulated store, on
//!   virtual time.
//! - [`control`]: the control plane the CLI and the API share (clients, submit,
//!   retire, cancel); [`daemon`]: API, worker and housekeeping until shutdown;
//!   [`cli`]: the command line.

#![warn(missing_docs, unreachable_pub)]

pub mod api;
pub mod azure;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod estimate;
#[cfg(feature = "testkit")]
pub mod fake_arm;
pub mod gallery;
pub mod gc;
pub mod handoff;
pub mod intake;
pub mod job;
pub mod metrics;
pub mod pages;
pub mod placement;
pub mod plan;
#[cfg(feature = "testkit")]
pub mod proxy;
pub mod queue;
#[cfg(feature = "testkit")]
pub mod simulation;
pub mod state;
pub mod storage;
pub mod telemetry;
pub mod vhd;
pub mod views;
