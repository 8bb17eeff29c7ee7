//! vhd-replicator: turns one custom VHD into the many identical copies an Azure
//! Batch pool needs, with server-side copies across storage accounts.
//!
//! The pipeline:
//!
//! ```text
//!  cli / api ──▶ intake queue ──▶ plan ──▶ engine: snapshot ▶ copies ▶ verify ▶ publish ──▶ handoff
//!                 (intake)        (plan)  (engine: copy, ranged, relay, poll, publish)    (handoff)
//!                 job state: one JSON document per job (state), ETag-guarded, one writer per run
//! ```
//!
//! The layers, lowest first. A module uses only the layers below its own
//! (and a few named edges inside one); `tests/architecture.rs` holds the
//! table and fails on any other edge.
//!
//! | layer | modules | what it is |
//! |---|---|---|
//! | foundation | [`metrics`], [`vhd`], [`estimate`], `placement`, `telemetry` | pure pieces: every metric, the fixed-VHD footer, throughput and ETA, which account each replica goes to, log setup |
//! | Azure client | [`azure`] | accounts, Shared Key and SAS signing, the one retry policy, request limits, the outbound call path, the shared transport, [`azure::ServiceError`] |
//! | settings and services | [`config`], [`storage`], [`queue`] | settings from TOML and `VHDREP__SECTION__KEY`, validated with the key named; the `BlobStore` trait and its Azure and instrumented stores; the `MessageQueue` trait and its Azure queue |
//! | domain | [`job`], [`plan`], [`state`], `views` | the submitted job and its checks; replicas, names, metadata; job documents, pool records and locks; the JSON views the API and the CLI share |
//! | integrations | [`gallery`], [`handoff`], `batch` | Compute Gallery versions through Resource Manager; the pool-creation hand-off and its sinks; the Batch data plane (Pool - Get, Add, Resize) |
//! | engine | [`engine`] | one job's run: prepare (source, snapshot, plan), copy (`Copy Blob`, ranged `Put Page From URL`, relays), poll, verify, publish, hand off, the pool stage, clean up; retire |
//! | control | [`control`], [`intake`], [`gc`], `watch` | what the CLI and the API share (clients, submit, cancel, retire); the queue consumer with leases and the poison queue; orphan collection; background scaling |
//! | surface | [`api`], `pages`, [`daemon`], [`cli`] | HTTP routes and health; the status pages; API, workers and housekeeping until shutdown; the command line |
//! | test kit | `testkit` (feature `testkit`) | the simulated store and queue, whole-daemon simulations, the Azure behaviour proxy, the fake Resource Manager and Batch |
//!
//! Reading the code for the first time: [`engine`]'s `lifecycle.rs` (a job's
//! phases in order), then `engine/run.rs` (the one writer of a job's
//! document), [`storage`]'s `BlobStore`, and [`azure::outbound`] (how every
//! call goes out).

#![warn(missing_docs, unreachable_pub)]

pub mod api;
pub mod azure;
pub(crate) mod batch;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod estimate;
pub mod gallery;
pub mod gc;
pub mod handoff;
pub mod intake;
pub mod job;
pub mod metrics;
pub(crate) mod pages;
pub(crate) mod placement;
pub mod plan;
pub mod queue;
pub mod state;
pub mod storage;
pub(crate) mod telemetry;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod vhd;
pub(crate) mod views;
pub(crate) mod watch;
