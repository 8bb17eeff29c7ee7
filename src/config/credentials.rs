//! An account's credential, resolved from its settings through the
//! [`SecretSource`]: a Shared Key from a variable or a file, or an Entra ID
//! credential of the kind asked for (or found in the environment).

use super::*;
use crate::azure::account::AccountCredential;
use crate::azure::auth::SharedKey;
use azure_core::credentials::TokenCredential;
use secrecy::SecretString;
use std::sync::Arc;

pub(super) fn resolve_credential(
    a: &AccountSettings,
    secrets: &dyn SecretSource,
) -> Result<AccountCredential, (&'static str, String)> {
    let entra = match a.auth.as_deref() {
        None | Some("shared_key") => false,
        Some("entra") => true,
        Some(other) => {
            return Err((
                "auth",
                format!("{other:?} is not \"shared_key\" or \"entra\""),
            ));
        }
    };
    match (entra, &a.key_env, &a.key_file) {
        (true, None, None) => entra_credential(a.credential.as_deref().unwrap_or("auto"), secrets)
            .map(AccountCredential::Entra)
            .map_err(|m| ("credential", m)),
        (true, _, _) => Err(("auth", "auth = \"entra\" takes no key_env or key_file; remove one or the other".into())),
        (false, Some(_), Some(_)) => Err(("key_env", "give key_env or key_file, not both".into())),
        (false, None, None) => Err(("key_env", "no credential: set key_env (a variable holding the account key), key_file, or auth = \"entra\"".into())),
        (false, Some(var), None) => {
            let value = secrets.env(var).ok_or_else(|| ("key_env", format!("environment variable {var} is not set or empty; export the account key in it")))?;
            SharedKey::new(&a.name, &SecretString::from(value))
                .map(AccountCredential::SharedKey)
                .map_err(|_| ("key_env", format!("the value of {var} is not a base64 account key")))
        }
        (false, None, Some(path)) => {
            let value = secrets.file(path).map_err(|e| ("key_file", format!("cannot read {path}: {e}")))?;
            SharedKey::new(&a.name, &SecretString::from(value))
                .map(AccountCredential::SharedKey)
                .map_err(|_| ("key_file", format!("{path} does not hold a base64 account key")))
        }
    }
}

/// The kinds of Entra ID credential an identity may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EntraKind {
    /// A managed identity (IMDS, App Service, Container Apps).
    ManagedIdentity,
    /// Workload identity federation (AKS).
    WorkloadIdentity,
    /// The Azure CLI's login (a workstation).
    AzureCli,
}

impl EntraKind {
    /// The kind a `credential` setting names; `auto` is judged from the
    /// environment, read through `secrets` like every other value.
    fn resolve(setting: &str, secrets: &dyn SecretSource) -> Result<Self, String> {
        Ok(match setting {
            "managed_identity" => EntraKind::ManagedIdentity,
            "workload_identity" => EntraKind::WorkloadIdentity,
            "azure_cli" => EntraKind::AzureCli,
            "auto" if secrets.env("AZURE_FEDERATED_TOKEN_FILE").is_some() => {
                EntraKind::WorkloadIdentity
            }
            "auto"
                if secrets.env("IDENTITY_ENDPOINT").is_some()
                    || secrets.env("MSI_ENDPOINT").is_some() =>
            {
                EntraKind::ManagedIdentity
            }
            "auto" => EntraKind::AzureCli,
            other => {
                return Err(format!(
                    "{other:?} is not one of auto, managed_identity, workload_identity, azure_cli"
                ))
            }
        })
    }
}

/// The Entra ID credential a `credential` setting names (no request is made
/// here: the SDK's credentials fetch tokens when first asked).
pub(super) fn entra_credential(
    setting: &str,
    secrets: &dyn SecretSource,
) -> Result<Arc<dyn TokenCredential>, String> {
    let kind = EntraKind::resolve(setting, secrets)?;
    let r: azure_core::Result<Arc<dyn TokenCredential>> = match kind {
        EntraKind::ManagedIdentity => {
            azure_identity::ManagedIdentityCredential::new(None).map(|c| c as _)
        }
        EntraKind::WorkloadIdentity => {
            azure_identity::WorkloadIdentityCredential::new(None).map(|c| c as _)
        }
        EntraKind::AzureCli => azure_identity::AzureCliCredential::new(None).map(|c| c as _),
    };
    r.map_err(|e| format!("cannot build the {kind:?} credential: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Env(HashMap<&'static str, &'static str>);

    impl SecretSource for Env {
        fn env(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| (*v).to_owned())
        }
        fn file(&self, path: &str) -> Result<String, String> {
            Err(format!("no file {path} here"))
        }
    }

    /// `auto` is judged from the environment as the secret source gives it,
    /// never from the process's own.
    #[test]
    fn auto_reads_the_environment_through_the_secret_source() {
        for (vars, kind) in [
            (
                vec![("AZURE_FEDERATED_TOKEN_FILE", "/t")],
                EntraKind::WorkloadIdentity,
            ),
            (
                vec![("IDENTITY_ENDPOINT", "http://x")],
                EntraKind::ManagedIdentity,
            ),
            (
                vec![("MSI_ENDPOINT", "http://x")],
                EntraKind::ManagedIdentity,
            ),
            (vec![], EntraKind::AzureCli),
        ] {
            let env = Env(vars.into_iter().collect());
            assert_eq!(EntraKind::resolve("auto", &env).unwrap(), kind);
        }
        let env = Env(HashMap::new());
        assert_eq!(
            EntraKind::resolve("managed_identity", &env).unwrap(),
            EntraKind::ManagedIdentity
        );
        let e = EntraKind::resolve("device_code", &env).unwrap_err();
        assert!(e.contains("device_code") && e.contains("azure_cli"), "{e}");
    }
}
