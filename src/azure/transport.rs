//! The HTTP transport and client options every Azure client shares.

use super::account::{AccountConfig, AccountCredential};
use super::auth::SharedKeyPolicy;
use super::{ErrorClass, ServiceError};
use azure_core::http::{RetryOptions, Transport};
use std::{sync::Arc, time::Duration};

/// Client options shared by blob and queue clients of one account: one HTTP
/// transport for all, the SDK retry policy off, Shared Key signing per try.
pub(crate) fn client_options(
    transport: &Transport,
    account: &AccountConfig,
) -> azure_core::http::ClientOptions {
    let mut options = azure_core::http::ClientOptions {
        transport: Some(transport.clone()),
        retry: RetryOptions::none(),
        ..Default::default()
    };
    if let AccountCredential::SharedKey(key) = &account.credential {
        options
            .per_try_policies
            .push(Arc::new(SharedKeyPolicy::new(key.clone())));
    }
    options
}

/// The HTTP transport every client shares: no automatic decompression (as the
/// storage crates require), no redirects, a connect timeout, and the accounts'
/// extra CA certificates trusted. The answer timeout of each attempt is the
/// retry policy's ([`RetryPolicy::timed`](super::retry::RetryPolicy::timed)), which also covers token requests.
pub(crate) fn shared_transport(
    accounts: &[AccountConfig],
    connect_timeout: Duration,
) -> Result<Transport, ServiceError> {
    let mut builder = reqwest::Client::builder()
        .no_gzip()
        .no_deflate()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout);
    for pem in accounts.iter().filter_map(|a| a.ca_pem.as_ref()) {
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
            ServiceError::other(
                "tls",
                "ca_file",
                ErrorClass::Invalid,
                format!("bad PEM: {e}"),
            )
        })?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    let client = builder.build().map_err(|e| {
        ServiceError::other(
            "tls",
            "ca_file",
            ErrorClass::Invalid,
            format!("cannot build the HTTP client: {e}"),
        )
    })?;
    Ok(Transport::new(Arc::new(client)))
}

/// The SDK's service version, or the override for emulators that lag behind.
pub(crate) fn service_version(account: &AccountConfig) -> Option<String> {
    account.api_version.clone()
}
