//! Entra ID end to end: the control and destination accounts authenticate with
//! bearer tokens only (no shared key) against Azurite over HTTPS with `--oauth
//! basic`, trusting the test
//! CA through `ca_file`. Cross-account copy sources in Entra accounts carry user
//! delegation SAS tokens built with `azure_storage_sas` (service version
//! 2026-04-06). Azurite 3.35 cannot check those: its newest user-delegation layout
//! is 2025-07-05 and leaves the snapshot time out, so it answers 403
//! CannotVerifyCopySource. The test therefore keeps a key on the source account
//! and checks the delegation SAS it builds for an Entra account by its fields;
//! a copy with it is left to a real Azure account.

use crate::helpers::*;
use async_trait::async_trait;
use azure_core::credentials::{AccessToken, Secret, TokenCredential, TokenRequestOptions};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64URL, Engine as _};
use std::{path::Path, sync::Arc, time::Duration};
use time::OffsetDateTime;
use vhd_replicator::{
    azure::account::AccountCredential, config::Settings, job::parse_job_json, state::JobState,
};

const SECURE_BLOB: &str = "https://127.0.0.1:10100";
const SECURE_QUEUE: &str = "https://127.0.0.1:10101";

/// Issues tokens shaped like Entra ID's, which Azurite's `--oauth basic` accepts
/// (it checks audience, issuer and lifetime, not the signature).
#[derive(Debug)]
struct TestEntra {
    requests: std::sync::atomic::AtomicU64,
    /// Token requests that fail first, as when IMDS or Entra ID is briefly away.
    fail_first: std::sync::atomic::AtomicU64,
}

#[async_trait]
impl TokenCredential for TestEntra {
    async fn get_token(
        &self,
        scopes: &[&str],
        _: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        assert_eq!(scopes, ["https://storage.azure.com/.default"]);
        use std::sync::atomic::Ordering::SeqCst;
        if self
            .fail_first
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                "the token endpoint is unavailable (test)",
            ));
        }
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let tid = "72f988bf-86f1-41af-91ab-2d7cd011db47";
        let header = B64URL.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "aud": "https://storage.azure.com",
            "iss": format!("https://sts.windows.net/{tid}/"),
            "iat": now - 60, "nbf": now - 60, "exp": now + 3600,
            "oid": "00000000-0000-0000-0000-00000000beef", "tid": tid,
        });
        let payload = B64URL.encode(claims.to_string());
        let token = format!(
            "{header}.{payload}.{}",
            B64URL.encode("not-a-real-signature")
        );
        Ok(AccessToken::new(
            Secret::new(token),
            OffsetDateTime::now_utc() + time::Duration::hours(1),
        ))
    }
}

/// A replication with Entra ID auth on the control and destination accounts
/// over HTTPS: queues, state, snapshots, same-account copies authorised by the
/// destination's token, hand-off; the first token requests fail and are retried.
/// The user delegation SAS for a cross-account source in an Entra account is
/// built and checked by its exact query string (see the module note).
#[tokio::test]
async fn entra_id_end_to_end_over_https() {
    require_azurite();
    let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join(".azurite/ca.pem");
    assert!(ca.exists(), "scripts/azurite.sh makes the test CA");
    let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let toml = entra_config(&id, &ca);
    let mut settings = Settings::from_toml(&toml)
        .unwrap()
        .validate(&Keys(keys()))
        .expect("entra config validates");
    // The first token requests fail: a token that cannot be had for a moment is
    // a transient failure, retried, not the end of the job.
    let credential = Arc::new(TestEntra {
        requests: Default::default(),
        fail_first: 3.into(),
    });
    for a in settings.accounts.iter_mut().filter(|a| a.name != "src") {
        assert!(matches!(a.credential, AccountCredential::Entra(_)));
        a.credential = AccountCredential::Entra(credential.clone());
    }
    let app = TestApp::spawn_with(settings).await;
    let source = format!("{SECURE_BLOB}/src/e-{id}-src/entra.vhd");
    let image = upload_sample(&app.control, &source, 2, 1, 70).await;
    let job_id = format!("entra-{id}");
    let job = serde_json::json!({"job_id": job_id, "source": source, "pool": {"id": "p", "os": "windows", "nodes": 80, "vm_size": "STANDARD_D2_V3"}, "container": format!("e-{id}")});
    app.control
        .submit(parse_job_json(&job.to_string()).unwrap())
        .await
        .unwrap();
    let doc = wait_for_end(&app.control, &job_id, Duration::from_secs(60)).await;
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);
    assert_eq!(doc.replicas.len(), 4);
    for r in &doc.replicas {
        assert_eq!(read_all(&app.control, &r.blob).await, image);
        assert!(r.uri.starts_with(SECURE_BLOB));
    }
    let handoff = drain(app.control.handoff.as_ref()).await;
    assert_eq!(handoff.len(), 1);
    assert!(!handoff[0].contains("sig="));
    assert!(
        credential
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "tokens were used"
    );
    assert_eq!(
        credential
            .fail_first
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the failing token requests were met and retried"
    );
    // Fan-out grew inside each Entra account from its seed: same-account copies
    // authorised by the destination's token, with no SAS on the source.
    for r in doc.replicas.iter().filter(|r| r.index >= 2) {
        let from = app
            .control
            .store
            .properties(&r.blob)
            .await
            .unwrap()
            .copy
            .unwrap()
            .source
            .unwrap();
        assert!(
            from.contains(&format!("/{}/", r.account)) && !from.contains("sig="),
            "{from}"
        );
    }
    // A cross-account source in an Entra account gets a user delegation SAS
    // (read-only, scoped to the snapshot, signed with a delegation key).
    let replica = doc.replicas[0]
        .blob
        .at_snapshot("2026-01-01T00:00:00.0000000Z");
    let url = app
        .control
        .store
        .copy_source_url(
            &replica,
            "dst2",
            vhd_replicator::storage::SourceRead::CopyBlob,
            OffsetDateTime::now_utc() + time::Duration::hours(2),
        )
        .await
        .unwrap();
    assert_user_delegation_sas(&url, &replica);
    app.shutdown().await;
}

/// The config: the control and destination accounts on Entra ID only, over HTTPS.
fn entra_config(id: &str, ca: &Path) -> String {
    let mut toml = format!(
        "[batch]\nsubscription = \"s\"\nregion = \"local\"\n[control]\naccount = \"ops\"\nintake_queue = \"e-{id}-jobs\"\npoison_queue = \"e-{id}-poison\"\nhandoff_queue = \"e-{id}-handoff\"\nstate_container = \"e-{id}-state\"\n[engine]\ncopy_method = \"async\"\nmin_poll_ms = 50\nidle_poll_ms = 100\n"
    );
    // The source account keeps a key (see the module note on user delegation SAS);
    // the control and destination accounts have none: Entra ID only.
    for (name, dest) in [
        ("ops", false),
        ("src", false),
        ("dst1", true),
        ("dst2", true),
    ] {
        let auth = if name == "src" {
            "key_env = \"VHDREP_KEY_SRC\"".to_owned()
        } else {
            "auth = \"entra\"\ncredential = \"azure_cli\"".to_owned()
        };
        toml.push_str(&format!(
            "[[accounts]]\nname = \"{name}\"\nblob_endpoint = \"{SECURE_BLOB}/{name}\"\nqueue_endpoint = \"{SECURE_QUEUE}/{name}\"\n{auth}\nca_file = \"{}\"\ndestination = {dest}\n",
            ca.display()
        ));
    }
    toml
}

/// The exact query string of a user delegation SAS for a snapshot: every
/// parameter once (a map would hide a second `snapshot=`, which Azure refuses),
/// the snapshot scoped by the token, read-only, signed with a delegation key.
fn assert_user_delegation_sas(url: &str, replica: &vhd_replicator::storage::BlobPath) {
    // The exact query string: every parameter once (a map would hide a second
    // `snapshot=`, which Azure refuses), the snapshot scoped by the token.
    let parsed = url::Url::parse(url).unwrap();
    let pairs: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
    let mut names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    let all = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(
        names.len(),
        all,
        "a parameter appears twice in {}",
        parsed.query().unwrap_or("")
    );
    assert_eq!(
        pairs
            .iter()
            .filter(|(k, v)| k == "snapshot" && v == "2026-01-01T00:00:00.0000000Z")
            .count(),
        1,
        "{}",
        parsed.query().unwrap_or("")
    );
    assert!(
        parsed.path().ends_with(&format!("/{}", replica.name)),
        "the token goes on the base blob's URL: {}",
        parsed.path()
    );
    let q: std::collections::HashMap<String, String> = pairs.into_iter().collect();
    assert_eq!(q.get("sp").map(String::as_str), Some("r"));
    assert_eq!(q.get("sr").map(String::as_str), Some("bs"));
    assert_eq!(
        q.get("skoid").map(String::as_str),
        Some("00000000-0000-0000-0000-00000000beef")
    );
    assert!(q.contains_key("sig") && q.contains_key("ske") && q.contains_key("st"));
}
