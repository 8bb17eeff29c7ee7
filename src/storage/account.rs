//! A storage account as the daemon uses it: endpoints, credential, limits and
//! role, resolved from the configuration (see [`crate::config`]).

use super::auth::SharedKey;
use azure_core::credentials::TokenCredential;
use std::{fmt, sync::Arc};
use url::Url;

/// How an account authenticates, resolved.
#[derive(Clone)]
pub enum AccountCredential {
    /// Shared Key from the account key.
    SharedKey(SharedKey),
    /// Entra ID token credential.
    Entra(Arc<dyn TokenCredential>),
}

impl fmt::Debug for AccountCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountCredential::SharedKey(k) => write!(f, "SharedKey({})", k.account()),
            AccountCredential::Entra(_) => write!(f, "Entra"),
        }
    }
}

/// One account, validated and ready to build clients for.
#[derive(Debug, Clone)]
pub struct AccountConfig {
    /// Account name.
    pub name: String,
    /// Blob endpoint without a trailing `/`.
    pub blob_endpoint: Url,
    /// Queue endpoint without a trailing `/`.
    pub queue_endpoint: Url,
    /// Credential.
    pub credential: AccountCredential,
    /// May receive replicas.
    pub destination: bool,
    /// Request rate cap.
    pub max_requests_per_second: u32,
    /// Concurrent copies cap.
    pub max_concurrent_copies: u32,
    /// Service version override.
    pub api_version: Option<String>,
    /// Extra CA certificates (PEM) to trust.
    pub ca_pem: Option<Vec<u8>>,
    /// Most replicas this account may hold.
    pub max_replicas: Option<u32>,
}
