//! The Azure client layer, below every service client: accounts and their
//! credentials, Shared Key and SAS signing, the one retry policy, the
//! per-account request limits, the outbound call path (rate limit, timeout,
//! metrics, retries), the shared HTTP transport, and the classified error of
//! every call. [`crate::storage`], [`crate::queue`] and [`crate::gallery`]
//! stand on it; it stands on nothing of the crate but [`crate::metrics`].

pub mod account;
pub mod auth;
mod error;
pub mod limits;
pub mod names;
pub mod outbound;
pub(crate) mod rest;
pub mod retry;
pub mod transport;

pub(crate) use error::map_sdk_error;
pub use error::{ErrorClass, ServiceError, TransportFailure};
