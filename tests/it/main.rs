//! Integration tests against a real Azurite over HTTP. Run them with
//! `scripts/test.sh`, which installs and starts Azurite first.

mod api;
mod bad_input;
mod cli;
mod conformance;
mod crash;
mod duplicates;
mod entra;
mod gallery;
mod handoff;
mod helpers;
mod observe;
mod pages;
mod poison;
mod pool_stage;
mod pools;
mod proxy;
mod ranges;
mod replicate;
mod secrets;
mod timeouts;
