//! Shared set-up for the integration tests: a real Azurite (started by
//! scripts/test.sh), unique queue and container names per test, the daemon on
//! port 0 in-process, and the binary for CLI tests.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};
use tokio_util::sync::CancellationToken;
use vhd_replicator::{
    config::{SecretSource, Settings, ValidatedSettings},
    control::Control,
    daemon::run_daemon,
    metrics::Metrics,
    state::JobDocument,
    storage::BlobPath,
};

/// Blob endpoint of the test Azurite.
pub const BLOB: &str = "http://127.0.0.1:10000";
/// Queue endpoint of the test Azurite.
pub const QUEUE: &str = "http://127.0.0.1:10001";

/// The emulator keys of scripts/local-env.sh (the one place they are written).
pub fn keys() -> HashMap<String, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/local-env.sh");
    let text = std::fs::read_to_string(&path).expect("scripts/local-env.sh is readable");
    text.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter(|l| !l.contains('$'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

/// Secrets from the key map, for in-process validation.
pub struct Keys(pub HashMap<String, String>);

impl SecretSource for Keys {
    fn env(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
    fn file(&self, path: &str) -> Result<String, String> {
        std::fs::read_to_string(path).map_err(|e| e.to_string())
    }
}

/// Fails the test with a clear message when Azurite is not there.
pub fn require_azurite() {
    for port in [10000, 10001] {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            panic!("Azurite is not listening on 127.0.0.1:{port}; run the suite with scripts/test.sh (it starts Azurite)");
        }
    }
}

/// One test's world: unique names, a temp dir, the config text.
pub struct TestEnv {
    /// Unique lower-case suffix.
    pub id: String,
    /// Temp dir for config and hand-off files.
    pub dir: tempfile::TempDir,
    /// The config TOML.
    pub toml: String,
}

impl TestEnv {
    /// A fresh environment; `extra` is appended to the config.
    pub fn new(extra: &str) -> Self {
        require_azurite();
        let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let dir = tempfile::tempdir().expect("temp dir");
        let handoff = dir.path().join("handoff");
        let toml = format!(
            r#"
[service]
listen = "127.0.0.1:0"
admin_token_env = "IT_ADMIN_TOKEN"

[batch]
subscription = "00000000-0000-0000-0000-000000000000"
region = "local"

[control]
account = "ops"
intake_queue = "it-{id}-jobs"
poison_queue = "it-{id}-poison"
handoff_queue = "it-{id}-handoff"
state_container = "it-{id}-state"

[handoff]
dir = "{handoff}"
linux_node_agent_sku_id = "batch.node.ubuntu 22.04"

[engine]
# Azurite has no Put Page From URL; ranged copies are tested behind the proxy.
copy_method = "async"
min_poll_ms = 50
idle_poll_ms = 100
lease_seconds = 30

{accounts}
"#,
            handoff = handoff.display(),
            accounts = accounts_toml(),
        );
        Self {
            id,
            dir,
            toml: merge_toml(&toml, extra),
        }
    }

    /// Validated settings of this environment.
    pub fn settings(&self) -> ValidatedSettings {
        self.settings_with(keys())
    }

    /// Validated settings with these secrets.
    pub fn settings_with(&self, secrets: HashMap<String, String>) -> ValidatedSettings {
        Settings::from_toml(&self.toml)
            .expect("test config parses")
            .validate(&Keys(secrets))
            .expect("test config validates")
    }

    /// Settings whose blob endpoints go through a proxy at `base` (queues stay direct).
    pub fn proxied(&self, base: &str, extra: &str) -> ValidatedSettings {
        let toml = merge_toml(&self.proxied_toml(base), extra);
        Settings::from_toml(&toml)
            .expect("test config parses")
            .validate(&Keys(keys()))
            .expect("test config validates")
    }

    /// The config with blob endpoints through a proxy at `base` (queues stay
    /// direct). The proxy performs Put Page From URL, so each account says
    /// so: its loopback, path-style endpoint would otherwise count as an
    /// emulator's, which `copy_method = "auto"` copies into with Copy Blob.
    pub fn proxied_toml(&self, base: &str) -> String {
        self.toml.replace(
            &format!("blob_endpoint = \"{BLOB}"),
            &format!("put_page_from_url = true\nblob_endpoint = \"{base}"),
        )
    }

    /// Settings whose blob endpoints go through a proxy at `blob` and queue
    /// endpoints through one at `queue`.
    pub fn proxied_both(&self, blob: &str, queue: &str, extra: &str) -> ValidatedSettings {
        let toml = merge_toml(
            &self.proxied_toml(blob).replace(
                &format!("queue_endpoint = \"{QUEUE}"),
                &format!("queue_endpoint = \"{queue}"),
            ),
            extra,
        );
        Settings::from_toml(&toml)
            .expect("test config parses")
            .validate(&Keys(keys()))
            .expect("test config validates")
    }

    /// [`TestEnv::proxied_toml`] written to a file, for the binary.
    pub fn proxied_config_file(&self, base: &str) -> PathBuf {
        let path = self.dir.path().join("proxied.toml");
        std::fs::write(&path, self.proxied_toml(base)).expect("write config");
        path
    }

    /// A control plane (no daemon).
    pub async fn control(&self) -> Control {
        let c = Control::azure(Arc::new(self.settings()), Metrics::new()).expect("clients build");
        c.ensure().await.expect("queues and state container");
        c
    }

    /// The config written to a file, for the binary.
    pub fn config_file(&self) -> PathBuf {
        let path = self.dir.path().join("config.toml");
        std::fs::write(&path, &self.toml).expect("write config");
        path
    }

    /// The job container of this test.
    pub fn container(&self) -> String {
        format!("it-{}", self.id)
    }

    /// URL of a source blob in the `src` account.
    pub fn source_url(&self, name: &str) -> String {
        format!("{BLOB}/src/it-{}-src/{name}", self.id)
    }

    /// A job JSON for this environment.
    pub fn job_json(&self, job_id: &str, source: &str, os: &str, nodes: u32) -> String {
        serde_json::json!({
            "job_id": job_id,
            "source": source,
            "pool": { "id": format!("pool-{}", self.id), "os": os, "nodes": nodes, "vm_size": "STANDARD_D2_V3" },
            "container": self.container(),
        })
        .to_string()
    }
}

/// Adds `extra` to `base`: keys under `[service]`, `[engine]` or `[handoff]` go into
/// the base's table of that name, anything else (such as more `[[accounts]]`) at
/// the end.
pub fn merge_toml(base: &str, extra: &str) -> String {
    let mut out = base.to_owned();
    let mut tail = String::new();
    let mut section: Option<String> = None;
    for line in extra.lines() {
        let t = line.trim();
        if t.starts_with("[[") {
            section = None;
            tail.push_str(line);
            tail.push('\n');
        } else if t.starts_with('[') {
            let header = t.to_owned();
            section = out
                .contains(&format!("{header}\n"))
                .then_some(header.clone());
            if section.is_none() {
                tail.push_str(line);
                tail.push('\n');
            }
        } else if let Some(h) = &section {
            let start = out.find(&format!("{h}\n")).expect("section exists") + h.len() + 1;
            let end = out[start..]
                .find("\n[")
                .map(|i| start + i + 1)
                .unwrap_or(out.len());
            let key = t.split('=').next().unwrap_or("").trim();
            let existing = out[start..end]
                .lines()
                .scan(start, |pos, l| {
                    let here = *pos;
                    *pos += l.len() + 1;
                    Some((here, l))
                })
                .find(|(_, l)| l.split('=').next().unwrap_or("").trim() == key && !key.is_empty());
            match existing {
                Some((at, l)) => out.replace_range(at..at + l.len(), line),
                None => out.insert_str(start, &format!("{line}\n")),
            }
        } else {
            tail.push_str(line);
            tail.push('\n');
        }
    }
    out + &tail
}

/// The `[[accounts]]` of the test Azurite.
pub fn accounts_toml() -> String {
    let mut out = String::new();
    for (name, dest) in [
        ("ops", false),
        ("src", false),
        ("dst1", true),
        ("dst2", true),
        ("dst3", true),
    ] {
        out.push_str(&format!(
            "[[accounts]]\nname = \"{name}\"\nblob_endpoint = \"{BLOB}/{name}\"\nqueue_endpoint = \"{QUEUE}/{name}\"\nkey_env = \"VHDREP_KEY_{}\"\ndestination = {dest}\n\n",
            name.to_uppercase()
        ));
    }
    out
}

/// The daemon, in-process on port 0.
pub struct TestApp {
    /// Its control plane.
    pub control: Control,
    /// Its HTTP address.
    pub addr: std::net::SocketAddr,
    /// Stops it.
    pub stop: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestApp {
    /// Starts the daemon for `env`.
    pub async fn spawn(env: &TestEnv) -> Self {
        Self::spawn_with(env.settings()).await
    }

    /// Starts the daemon with these settings.
    pub async fn spawn_with(settings: ValidatedSettings) -> Self {
        let control = Control::azure(Arc::new(settings), Metrics::new()).expect("clients build");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(run_daemon(control.clone(), listener, stop.clone()));
        control.ensure().await.expect("queues and state container");
        Self {
            control,
            addr,
            stop,
            handle,
        }
    }

    /// URL of a route.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the daemon and waits for it.
    pub async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(40), self.handle)
            .await
            .expect("daemon stops within its grace period")
            .expect("daemon task")
            .expect("daemon ran cleanly");
    }
}

/// Uploads a sample fixed VHD and returns its bytes.
pub async fn upload_sample(
    control: &Control,
    url: &str,
    mib: u64,
    data_mib: u64,
    seed: u8,
) -> Vec<u8> {
    let blob = vhd_replicator::job::locate_source(url, &control.settings)
        .expect("source in a configured account");
    let image = vhd_replicator::vhd::sample_image(mib, data_mib, seed);
    control
        .store
        .ensure_container(&blob.account, &blob.container)
        .await
        .unwrap();
    control
        .store
        .put_page_blob(&blob, bytes::Bytes::from(image.clone()))
        .await
        .expect("upload sample VHD");
    image
}

/// Waits until the job has ended.
pub async fn wait_for_end(control: &Control, id: &str, within: Duration) -> JobDocument {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some((d, _)) = control.state.load(id).await.expect("state readable") {
            if d.state().is_terminal() {
                return d;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} did not end within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads a whole blob.
pub async fn read_all(control: &Control, blob: &BlobPath) -> Vec<u8> {
    control
        .store
        .read(blob, None)
        .await
        .expect("read blob")
        .0
        .to_vec()
}

/// Receives every message currently visible on a queue (hiding them for a minute).
pub async fn drain(queue: &dyn vhd_replicator::queue::MessageQueue) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let got = queue
            .receive(32, Duration::from_secs(60))
            .await
            .expect("receive");
        if got.is_empty() {
            return out;
        }
        out.extend(got.into_iter().map(|m| m.text));
    }
}

/// Path of the built binary.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_vhd-replicator")
}

/// The daemon's /metrics once it shows every one of `lines` (counters move just
/// after a job's last write, so a read right after a job ends may be early).
pub async fn metrics_showing(app: &TestApp, lines: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = reqwest::get(app.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let missing: Vec<&&str> = lines.iter().filter(|l| !text.contains(**l)).collect();
        if missing.is_empty() {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing {missing:?} in\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Start Copy requests per replica blob. Relays (short-lived same-account
/// copies of the snapshot) are left out: a resumed run makes them again.
pub fn replica_starts(
    proxy: &vhd_replicator::testkit::proxy::Proxy,
) -> std::collections::HashMap<String, u32> {
    proxy
        .copy_starts()
        .into_iter()
        .filter(|(blob, _)| !blob.contains(vhd_replicator::engine::relay::RELAY_PREFIX))
        .collect()
}

/// What a screenshot holds, by kind of pixel.
#[derive(Debug)]
pub struct Pixels {
    pub width: usize,
    pub height: usize,
    /// Near black (text).
    pub dark: usize,
    /// Strongly blue (a progress bar's fill).
    pub blue: usize,
    /// Near white (background).
    pub light: usize,
}

impl Pixels {
    pub fn read(path: &std::path::Path) -> Self {
        let decoder = png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(path).expect("the screenshot exists"),
        ));
        let mut reader = decoder.read_info().expect("a PNG");
        let mut buf = vec![0; reader.output_buffer_size().expect("a size")];
        let info = reader.next_frame(&mut buf).expect("a frame");
        let channels = info.color_type.samples();
        let mut p = Pixels {
            width: info.width as usize,
            height: info.height as usize,
            dark: 0,
            blue: 0,
            light: 0,
        };
        for px in buf[..info.buffer_size()].chunks(channels) {
            let (r, g, b) = if channels >= 3 {
                (px[0], px[1], px[2])
            } else {
                (px[0], px[0], px[0])
            };
            if r < 90 && g < 90 && b < 90 {
                p.dark += 1;
            } else if b > 170 && r < 110 && g < 170 {
                p.blue += 1;
            } else if r > 230 && g > 230 && b > 230 {
                p.light += 1;
            }
        }
        p
    }
}

/// Loads `url` in headless Chromium at `size`: its DOM after scripts ran, and
/// whether a screenshot was written to `shot`.
pub async fn chromium_capture(
    url: &str,
    profile: &std::path::Path,
    shot: &std::path::Path,
    size: (u32, u32),
) -> (String, bool) {
    let (url, profile, shot) = (url.to_owned(), profile.to_owned(), shot.to_owned());
    tokio::task::spawn_blocking(move || {
        let common = |c: &mut std::process::Command| {
            c.args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.display()));
        };
        let mut dump = std::process::Command::new("chromium");
        common(&mut dump);
        let dom = dump
            .args(["--dump-dom", &url])
            .output()
            .expect("chromium runs (scripts/test.sh installs it)");
        let mut take = std::process::Command::new("chromium");
        common(&mut take);
        let taken = take
            .arg(format!("--screenshot={}", shot.display()))
            .arg(format!("--window-size={},{}", size.0, size.1))
            .arg(&url)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&dom.stdout).into_owned(),
            taken.status.success() && shot.exists(),
        )
    })
    .await
    .unwrap()
}

/// Copies a screenshot into `VHDREP_SCREENSHOT_DIR`, when set, for people to
/// look at (scripts/test.sh sets it to `target/screenshots`).
pub fn keep_screenshot(shot: &std::path::Path, name: &str) {
    if let Ok(dir) = std::env::var("VHDREP_SCREENSHOT_DIR") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(shot, std::path::Path::new(&dir).join(name)).unwrap();
    }
}

/// Runs the binary with the accounts' keys in its environment; it must exit 0.
pub fn run_ok(args: &[&str]) -> String {
    let vars: Vec<(String, String)> = keys()
        .into_iter()
        .filter(|(k, _)| k.starts_with("VHDREP_KEY_"))
        .collect();
    let out = std::process::Command::new(binary())
        .args(args)
        .envs(vars)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Hands out `token` for `scope` only (a test's Entra credential for a fake
/// service); any other scope fails the test.
#[derive(Debug)]
pub struct ScopedToken {
    /// The one scope it serves.
    pub scope: &'static str,
    /// The token.
    pub token: &'static str,
}

#[async_trait::async_trait]
impl azure_core::credentials::TokenCredential for ScopedToken {
    async fn get_token(
        &self,
        scopes: &[&str],
        _: Option<azure_core::credentials::TokenRequestOptions<'_>>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        assert_eq!(scopes, [self.scope]);
        Ok(azure_core::credentials::AccessToken::new(
            azure_core::credentials::Secret::new(self.token),
            time::OffsetDateTime::now_utc() + time::Duration::hours(1),
        ))
    }
}
