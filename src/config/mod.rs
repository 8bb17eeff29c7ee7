//! Configuration: raw [`Settings`] as read from TOML and `VHDREP__SECTION__KEY`
//! environment variables, then [`Settings::validate`] into [`ValidatedSettings`],
//! reporting every problem at once with the key it concerns.

use crate::azure::account::AccountConfig;
use secrecy::SecretString;
use std::{fmt, net::SocketAddr, path::Path, time::Duration};
use url::Url;

mod checks;
mod credentials;
mod settings;

pub use settings::*;

use checks::{toml_de, Problems};

/// The file `--config` defaults to.
pub(crate) const DEFAULT_CONFIG: &str = "config/default.toml";

/// Settings that passed validation.
#[derive(Debug, Clone)]
pub struct ValidatedSettings {
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// Admin token for mutating routes, when its variable is set.
    pub admin_token: Option<SecretString>,
    /// The variable the admin token is read from (`service.admin_token_env`).
    pub admin_token_env: String,
    /// Log as JSON lines.
    pub log_json: bool,
    /// Drain time on shutdown.
    pub shutdown_grace: Duration,
    /// `[batch]`
    pub batch: BatchSettings,
    /// `[control]`
    pub control: ControlSettings,
    /// Hand-off directory.
    pub handoff_dir: Option<std::path::PathBuf>,
    /// Hand-off webhook.
    pub handoff_webhook: Option<Url>,
    /// `[handoff]` as given (encoding and add-pool defaults).
    pub handoff: HandoffSettings,
    /// `[limits]`
    pub limits: LimitSettings,
    /// `[engine]`
    pub engine: EngineSettings,
    /// `[gc]`
    pub gc: GcSettings,
    /// All accounts, in configuration order.
    pub accounts: Vec<AccountConfig>,
    /// `[gallery]`, when configured.
    pub gallery: Option<GalleryConfig>,
    /// `[pool_stage]`, when configured.
    pub pool_stage: Option<PoolStageConfig>,
}

impl ValidatedSettings {
    /// The retry policy of every outbound call, with the configured timeout.
    pub fn retry_policy(&self) -> crate::azure::retry::RetryPolicy {
        crate::azure::retry::RetryPolicy::with_timeout(Duration::from_secs(
            self.engine.request_timeout_seconds,
        ))
    }

    /// What the daemon alone must satisfy (checked by `run` and `validate`, not
    /// by commands that only talk to storage): an HTTP API reachable beyond
    /// loopback needs the admin token, or anyone who reaches the port can submit,
    /// cancel and retire.
    pub(crate) fn check_daemon(&self) -> Result<(), ConfigError> {
        let admin_token_env = self.admin_token_env.as_str();
        if self.listen.ip().is_loopback() || self.admin_token.is_some() {
            return Ok(());
        }
        Err(ConfigError::Invalid(vec![ConfigProblem {
            key: "service.listen".into(),
            message: format!(
                "{} accepts connections from other hosts, and service.admin_token_env names {} which is not set: every mutating route (submit, cancel, retire) would be open; set {} to a secret token, or listen on 127.0.0.1",
                self.listen,
                if admin_token_env.is_empty() { "no variable" } else { admin_token_env },
                if admin_token_env.is_empty() { "service.admin_token_env and that variable" } else { admin_token_env },
            ),
        }]))
    }

    /// How long to wait for a connection.
    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.engine.connect_timeout_seconds)
    }

    /// The account with this name.
    pub fn account(&self, name: &str) -> Option<&AccountConfig> {
        self.accounts.iter().find(|a| a.name == name)
    }

    /// Names of the accounts that may receive replicas.
    pub(crate) fn destination_accounts(&self) -> Vec<String> {
        self.accounts
            .iter()
            .filter(|a| a.destination)
            .map(|a| a.name.clone())
            .collect()
    }
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key, e.g. `accounts[2].key_env`.
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Configuration that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment could not be read or parsed.
    #[error("cannot read configuration: {0}")]
    Load(String),
    /// The values are wrong.
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigProblem>),
}

/// Where secrets come from during validation (the process environment and files,
/// or a map in tests).
pub trait SecretSource {
    /// An environment variable.
    fn env(&self, name: &str) -> Option<String>;
    /// A file's contents.
    fn file(&self, path: &str) -> Result<String, String>;
}

/// The process environment and file system.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ProcessSecrets;

impl SecretSource for ProcessSecrets {
    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
    fn file(&self, path: &str) -> Result<String, String> {
        std::fs::read_to_string(path).map_err(|e| e.to_string())
    }
}

impl Settings {
    /// Reads the TOML file and `VHDREP__SECTION__KEY` overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::Load(format!(
                "{} does not exist; pass --config FILE",
                path.display()
            )));
        }
        let raw = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("VHDREP")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .map_err(|e| ConfigError::Load(format!("{}: {e}", path.display())))?;
        raw.try_deserialize()
            .map_err(|e| ConfigError::Load(format!("{}: {e}", path.display())))
    }

    /// Reads a TOML string (no environment), for tests and tools.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml_de(text)
    }

    /// Checks every value and resolves credentials; reports all problems at once,
    /// each with its key (one check per section, as they compose).
    pub fn validate(&self, secrets: &dyn SecretSource) -> Result<ValidatedSettings, ConfigError> {
        let mut problems = Problems::default();
        let listen = self.service.check(&mut problems);
        self.batch.check(&mut problems);
        self.control.check(&mut problems);
        self.limits.check(&mut problems);
        self.engine.check(&mut problems);
        let handoff_webhook = self.handoff.check(&mut problems);
        let accounts = self.check_accounts(secrets, &mut problems);
        let gallery = self
            .gallery
            .as_ref()
            .and_then(|g| g.check(&self.batch, &self.accounts, secrets, &mut problems));
        let pool_stage = self
            .pool_stage
            .as_ref()
            .and_then(|s| s.check(self.gallery.is_some(), secrets, &mut problems));
        let problems = problems.0;
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        let admin_token = if self.service.admin_token_env.is_empty() {
            None
        } else {
            secrets
                .env(&self.service.admin_token_env)
                .map(SecretString::from)
        };
        Ok(ValidatedSettings {
            listen: listen.expect("checked above"),
            admin_token,
            admin_token_env: self.service.admin_token_env.clone(),
            log_json: self.service.log_format == LogFormat::Json,
            shutdown_grace: Duration::from_secs(self.service.shutdown_grace_seconds),
            batch: self.batch.clone(),
            control: self.control.clone(),
            handoff_dir: (!self.handoff.dir.is_empty()).then(|| self.handoff.dir.clone().into()),
            handoff_webhook,
            handoff: self.handoff.clone(),
            limits: self.limits.clone(),
            engine: self.engine.clone(),
            gc: self.gc.clone(),
            accounts,
            gallery,
            pool_stage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Map(HashMap<String, String>);
    impl SecretSource for Map {
        fn env(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
        fn file(&self, path: &str) -> Result<String, String> {
            self.0
                .get(path)
                .cloned()
                .ok_or_else(|| "no such file".into())
        }
    }
    const KEY: &str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    fn secrets() -> Map {
        Map(HashMap::from([
            ("K_OPS".to_owned(), KEY.to_owned()),
            ("K_DST".to_owned(), KEY.to_owned()),
        ]))
    }

    const GOOD: &str = r#"
[batch]
subscription = "00000000-0000-0000-0000-000000000000"
region = "westeurope"
[control]
account = "ops"
[[accounts]]
name = "ops"
blob_endpoint = "http://127.0.0.1:10000/ops/"
queue_endpoint = "http://127.0.0.1:10001/ops"
key_env = "K_OPS"
destination = false
[[accounts]]
name = "dst1"
key_env = "K_DST"
region = "westeurope"
"#;

    fn problems(toml: &str) -> Vec<ConfigProblem> {
        match Settings::from_toml(toml).unwrap().validate(&secrets()) {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    fn keys(toml: &str) -> Vec<String> {
        problems(toml).into_iter().map(|p| p.key).collect()
    }

    /// A value outside an enumerated setting's words is refused at load,
    /// naming the key and the words it takes.
    #[test]
    fn enumerated_settings_name_the_key_and_the_words() {
        for (section, key, bad, words) in [
            ("service", "log_format", "jsn", ["text", "json"]),
            ("handoff", "queue_encoding", "b64", ["text", "base64"]),
            ("engine", "copy_method", "fast", ["auto", "ranges"]),
            ("engine", "strategy", "tree", ["fanout", "naive"]),
        ] {
            let text = format!("{GOOD}\n[{section}]\n{key} = \"{bad}\"\n");
            let e = match Settings::from_toml(&text) {
                Ok(s) => s.validate(&secrets()).err().map(|e| e.to_string()),
                Err(e) => Some(e.to_string()),
            }
            .unwrap_or_default();
            assert!(
                e.contains(key) && e.contains(bad) && words.iter().all(|w| e.contains(w)),
                "{section}.{key}: {e}"
            );
        }
        let v = Settings::from_toml(&format!("{GOOD}\n[service]\nlog_format = \"json\"\n"))
            .unwrap()
            .validate(&secrets())
            .unwrap();
        assert!(v.log_json);
    }

    #[test]
    fn a_good_config_validates_with_defaults() {
        let v = Settings::from_toml(GOOD)
            .unwrap()
            .validate(&secrets())
            .unwrap();
        assert_eq!(v.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(v.control.intake_queue, "vhd-jobs");
        assert_eq!(
            v.accounts[0].blob_endpoint.as_str(),
            "http://127.0.0.1:10000/ops"
        );
        assert_eq!(
            v.accounts[1].blob_endpoint.as_str(),
            "https://dst1.blob.core.windows.net/"
        );
        assert_eq!(v.destination_accounts(), vec!["dst1"]);
        assert_eq!(v.limits.windows_nodes_per_vhd, 20);
        assert!(v.admin_token.is_none());
    }

    const GALLERY: &str = r#"
[gallery]
subscription = "00000000-0000-0000-0000-000000000000"
resource_group = "images"
gallery = "g"
image = "render-win"
publisher = "contoso"
offer = "render"
sku = "win2016"
region = "westeurope"
credential = "azure_cli"
"#;

    /// `[pool_stage]`: each wrong value named by its key (a URL that is not
    /// one, background scaling without a gallery to scale, a headroom out of
    /// range, a template that cannot be read); the defaults of a good one.
    #[test]
    fn a_pool_stage_is_checked_key_by_key() {
        let bad = "\n[pool_stage]\nbatch_url = \"mybatch\"\ncredential = \"azure_cli\"\nwatch_seconds = 60\nheadroom = -1.0\ntemplate = \"/nowhere/template.json\"\n";
        let got = problems(&format!("{GOOD}{bad}"));
        let keys: Vec<&str> = got.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "pool_stage.batch_url",
            "pool_stage.watch_seconds",
            "pool_stage.headroom",
            "pool_stage.template",
        ] {
            assert!(keys.contains(&k), "{k} in {got:?}");
        }
        let good = "\n[pool_stage]\nbatch_url = \"https://mybatch.westeurope.batch.azure.com/\"\ncredential = \"azure_cli\"\n";
        let v = Settings::from_toml(&format!("{GOOD}{good}"))
            .unwrap()
            .validate(&secrets())
            .unwrap();
        let s = v.pool_stage.expect("configured");
        assert_eq!(
            s.batch_url.as_str(),
            "https://mybatch.westeurope.batch.azure.com/"
        );
        assert!(s.settings.create && s.settings.resize && s.template.is_empty());
        assert_eq!((s.settings.watch_seconds, s.settings.headroom), (0, 0.25));
    }

    /// A gallery must be the Batch account's (subscription and region), and
    /// every destination account needs its resource group for the version's
    /// `storageAccountId`; each problem names its key.
    #[test]
    fn a_gallery_elsewhere_or_without_staging_ids_is_refused() {
        let bad = GALLERY
            .replace("region = \"westeurope\"", "region = \"eastus\"")
            .replace(
                "subscription = \"00000000-0000-0000-0000-000000000000\"",
                "subscription = \"11111111-0000-0000-0000-000000000000\"",
            )
            .replace(
                "[gallery]",
                "[gallery]\nmin_replicas = 0\nstorage_account_type = \"Standard_GRS\"",
            );
        let got = problems(&format!("{GOOD}{bad}"));
        let keys: Vec<&str> = got.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "gallery.subscription",
            "gallery.region",
            "gallery.min_replicas",
            "gallery.storage_account_type",
            "accounts[1].resource_group",
        ] {
            assert!(keys.contains(&k), "{k} in {got:?}");
        }
        let region = got.iter().find(|p| p.key == "gallery.region").unwrap();
        assert!(region.message.contains("westeurope"), "{}", region.message);
        let good = format!("{GOOD}{GALLERY}").replace(
            "name = \"dst1\"",
            "name = \"dst1\"\nresource_group = \"storage\"",
        );
        let v = Settings::from_toml(&good)
            .unwrap()
            .validate(&secrets())
            .unwrap();
        let g = v.gallery.expect("configured");
        assert_eq!(
            g.storage_account_ids["dst1"],
            "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/storage/providers/Microsoft.Storage/storageAccounts/dst1"
        );
        assert_eq!(g.arm_endpoint.as_str(), "https://management.azure.com/");
        assert_eq!(g.replicas_for(200), 4);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Settings::from_toml(&format!("{GOOD}\nbogus = 1\n")).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = Settings::from_toml(&GOOD.replace("[control]", "[control]\nqueue = \"x\""))
            .unwrap_err();
        assert!(err.to_string().contains("queue"), "{err}");
    }

    #[test]
    fn zero_limits_are_named() {
        let t = GOOD.replace(
            "name = \"dst1\"",
            "name = \"dst1\"\nmax_concurrent_copies = 0\nmax_requests_per_second = 0",
        ) + "[limits]\nwindows_nodes_per_vhd = 0\n";
        let k = keys(&t);
        assert!(
            k.contains(&"accounts[1].max_concurrent_copies".to_owned()),
            "{k:?}"
        );
        assert!(
            k.contains(&"accounts[1].max_requests_per_second".to_owned()),
            "{k:?}"
        );
        assert!(
            k.contains(&"limits.windows_nodes_per_vhd".to_owned()),
            "{k:?}"
        );
    }

    #[test]
    fn duplicate_accounts_missing_control_and_no_destination() {
        let t = GOOD.replace("name = \"dst1\"", "name = \"ops\"");
        assert!(keys(&t).contains(&"accounts[1].name".to_owned()));
        let t = GOOD.replace("account = \"ops\"", "account = \"nope\"");
        assert_eq!(keys(&t), vec!["control.account"]);
        let t = GOOD.replace("region = \"westeurope\"\n\"#", "") + "";
        let t = t.replace(
            "key_env = \"K_DST\"",
            "key_env = \"K_DST\"\ndestination = false",
        );
        assert!(keys(&t).contains(&"accounts".to_owned()));
    }

    #[test]
    fn malformed_endpoints_and_missing_keys() {
        let t = GOOD.replace("http://127.0.0.1:10001/ops", "not a url");
        assert_eq!(keys(&t), vec!["accounts[0].queue_endpoint"]);
        let t = GOOD.replace("K_DST", "K_MISSING");
        let p = problems(&t);
        assert_eq!(p[0].key, "accounts[1].key_env");
        assert!(p[0].message.contains("K_MISSING"));
        let t = GOOD.replace("key_env = \"K_DST\"\n", "");
        assert_eq!(keys(&t), vec!["accounts[1].key_env"]);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let t = GOOD
            .replace("127.0.0.1:10001/ops", "::bad")
            .replace("K_DST", "K_MISSING")
            .replace("account = \"ops\"", "account = \"zzz\"")
            + "[service]\nlisten = \"nowhere\"\n";
        let k = keys(&t);
        assert_eq!(k.len(), 4, "{k:?}");
    }

    #[test]
    fn region_mismatch_of_a_destination_is_refused() {
        let t = GOOD.replace("region = \"westeurope\"\n\"#", "").replace(
            "key_env = \"K_DST\"\nregion = \"westeurope\"",
            "key_env = \"K_DST\"\nregion = \"eastus\"",
        );
        assert_eq!(keys(&t), vec!["accounts[1].region"]);
    }

    /// An API beyond loopback without the admin token is refused for the daemon
    /// (naming both keys); with the token, or on loopback, it is fine.
    #[test]
    fn an_open_api_beyond_loopback_is_refused() {
        let open =
            format!("{GOOD}\n[service]\nlisten = \"0.0.0.0:9464\"\nadmin_token_env = \"TOKEN\"\n");
        let v = Settings::from_toml(&open)
            .unwrap()
            .validate(&secrets())
            .unwrap();
        let Err(ConfigError::Invalid(p)) = v.check_daemon() else {
            panic!("accepted an open API")
        };
        assert_eq!(p[0].key, "service.listen");
        assert!(
            p[0].message.contains("service.admin_token_env") && p[0].message.contains("TOKEN"),
            "{}",
            p[0].message
        );
        let mut with_token = secrets();
        with_token.0.insert("TOKEN".into(), "s3cret".into());
        let v = Settings::from_toml(&open)
            .unwrap()
            .validate(&with_token)
            .unwrap();
        assert!(v.check_daemon().is_ok());
        let v = Settings::from_toml(GOOD)
            .unwrap()
            .validate(&secrets())
            .unwrap();
        assert!(v.check_daemon().is_ok(), "loopback needs no token");
        let v6 = format!("{GOOD}\n[service]\nlisten = \"[::]:9464\"\n");
        let v = Settings::from_toml(&v6)
            .unwrap()
            .validate(&secrets())
            .unwrap();
        assert!(v.check_daemon().is_err(), "[::] is beyond loopback too");
    }
}
