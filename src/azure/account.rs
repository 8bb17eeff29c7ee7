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
    /// Whether the service does Put Page From URL, as configured.
    pub put_page_from_url: Option<bool>,
}

impl AccountConfig {
    /// Whether the blob endpoint looks like a storage emulator rather than an
    /// Azure service: a path-style URL (the account name as the first path
    /// segment, as Azurite and the legacy emulator serve) or a host that is
    /// `localhost` or an IP address. Azure's own endpoints are virtual-host
    /// style (`https://{account}.blob.core.windows.net`).
    pub(crate) fn is_emulator(&self) -> bool {
        let path_style = self
            .blob_endpoint
            .path_segments()
            .and_then(|mut s| s.next())
            .is_some_and(|first| first == self.name);
        let local_host = match self.blob_endpoint.host() {
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            Some(url::Host::Ipv4(_) | url::Host::Ipv6(_)) => true,
            None => false,
        };
        path_style || local_host
    }

    /// Whether `copy_method = "auto"` may copy into this account by ranges:
    /// as configured, else unless the endpoint is an emulator's.
    pub(crate) fn does_put_page_from_url(&self) -> bool {
        self.put_page_from_url
            .unwrap_or_else(|| !self.is_emulator())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(name: &str, endpoint: &str) -> AccountConfig {
        let key = secrecy::SecretString::from("a2V5".to_owned());
        AccountConfig {
            name: name.to_owned(),
            blob_endpoint: Url::parse(endpoint).unwrap(),
            queue_endpoint: Url::parse(endpoint).unwrap(),
            credential: AccountCredential::SharedKey(SharedKey::new(name, &key).unwrap()),
            destination: true,
            max_requests_per_second: 1,
            max_concurrent_copies: 1,
            api_version: None,
            ca_pem: None,
            max_replicas: None,
            put_page_from_url: None,
        }
    }

    #[test]
    fn emulator_endpoints_are_told_from_azure_ones() {
        for (name, endpoint, emulator) in [
            (
                "devstoreaccount1",
                "http://127.0.0.1:10000/devstoreaccount1",
                true,
            ),
            (
                "devstoreaccount1",
                "http://localhost:10000/devstoreaccount1",
                true,
            ),
            ("acct", "http://[::1]:10000/acct", true),
            ("acct", "https://azurite.internal:10000/acct", true),
            ("acct", "https://10.0.0.4", true),
            ("acct", "https://acct.blob.core.windows.net", false),
            ("acct", "https://acct.blob.core.chinacloudapi.cn", false),
            ("acct", "https://acct.blob.local.azurestack.external", false),
            (
                "acct",
                "https://acct-secondary.blob.core.windows.net/",
                false,
            ),
        ] {
            assert_eq!(
                account(name, endpoint).is_emulator(),
                emulator,
                "{endpoint}"
            );
        }
        let mut proxy = account("acct", "http://127.0.0.1:9/acct");
        assert!(!proxy.does_put_page_from_url());
        proxy.put_page_from_url = Some(true);
        assert!(proxy.does_put_page_from_url());
        let mut azure = account("acct", "https://acct.blob.core.windows.net");
        assert!(azure.does_put_page_from_url());
        azure.put_page_from_url = Some(false);
        assert!(!azure.does_put_page_from_url());
    }
}
