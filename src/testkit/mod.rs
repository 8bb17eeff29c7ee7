//! The test kit, in one place and out of release builds (feature `testkit`,
//! which the tests and benchmarks turn on): stand-ins that follow the
//! services' published protocols, so tests exercise the daemon's real code.
//!
//! - [`sim`]: blob storage in memory, instant for unit tests or a model of
//!   Azure's bandwidths, limits and faults on virtual time.
//! - [`memory_queue`]: a queue in memory with Azure's visibility and
//!   pop-receipt rules.
//! - [`simulation`]: whole-daemon runs (intake, engine, kills, duplicate
//!   deliveries) on the simulated store.
//! - [`proxy`]: an Azure behaviour proxy in front of Azurite: faults,
//!   throttling, held copies, recording, and the Put Page From URL Azurite
//!   lacks.
//! - [`fake_arm`]: a fake Azure Resource Manager for the Compute Gallery.
//! - [`fake_batch`]: a fake Batch data plane for the pool stage.

#[cfg(feature = "testkit")]
pub mod fake_arm;
#[cfg(feature = "testkit")]
pub mod fake_batch;
pub mod memory_queue;
#[cfg(feature = "testkit")]
pub mod proxy;
#[cfg(feature = "testkit")]
mod server;
pub mod sim;
#[cfg(feature = "testkit")]
pub mod simulation;
