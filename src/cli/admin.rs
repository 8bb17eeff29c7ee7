//! `run`, `validate` and `sample-vhd`.

use super::{connect, failed, load, load_daemon, usage_error, ConfigArg, EXIT_USAGE};
use crate::daemon::run_daemon;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// `run`: the daemon until SIGTERM or SIGINT.
pub(super) async fn run(config: ConfigArg) -> ExitCode {
    let settings = match load_daemon(&config.config) {
        Ok(s) => s,
        Err(e) => return usage_error(e),
    };
    crate::telemetry::init(settings.log_json);
    let listen = settings.listen;
    let control = match connect(settings) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => return usage_error(format!("service.listen: cannot listen on {listen}: {e}")),
    };
    let stop = CancellationToken::new();
    tokio::spawn(shutdown_signal(stop.clone()));
    match run_daemon(control, listener, stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failed(format!("{e:#}")),
    }
}

pub(super) async fn validate(path: &std::path::Path, online: bool) -> ExitCode {
    let settings = match load_daemon(path) {
        Ok(s) => s,
        Err(e) => return usage_error(e),
    };
    println!(
        "{}: configuration is valid ({} accounts, {} destinations)",
        path.display(),
        settings.accounts.len(),
        settings.destination_accounts().len()
    );
    if !online {
        return ExitCode::SUCCESS;
    }
    let control = match connect(settings) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut bad = 0;
    for a in &control.settings.accounts {
        match control.store.account_info(&a.name).await {
            Ok(info) => {
                let verdict = if a.destination {
                    info.suits_batch_images().err()
                } else {
                    None
                };
                match verdict {
                    None => println!("  {}: reachable, {} {}", a.name, info.sku, info.kind),
                    Some(why) => {
                        bad += 1;
                        println!("  {}: NOT USABLE as a destination: {why}", a.name);
                    }
                }
            }
            Err(e) => {
                bad += 1;
                println!(
                    "  NOT REACHABLE: {}",
                    crate::storage::account_info_problem(&a.name, &e)
                );
            }
        }
    }
    if let Some(g) = &control.settings.gallery {
        let checked = crate::gallery::Gallery::new(
            g,
            control.settings.retry_policy(),
            control.settings.connect_timeout(),
        )
        .map_err(crate::gallery::GalleryError::from);
        let checked = match checked {
            Ok(gallery) => gallery.check_gallery().await,
            Err(e) => Err(e),
        };
        match checked {
            Ok(found) => println!("  {found}: reachable"),
            Err(e) => {
                bad += 1;
                println!("  GALLERY NOT USABLE: {e}");
            }
        }
    }
    if bad > 0 {
        ExitCode::from(EXIT_USAGE)
    } else {
        ExitCode::SUCCESS
    }
}

/// `sample-vhd`: uploads a small fixed VHD as a page blob.
pub(super) async fn sample_vhd(
    config: ConfigArg,
    url: String,
    size_mib: u64,
    data_mib: u64,
) -> ExitCode {
    let settings = match load(&config.config) {
        Ok(s) => s,
        Err(e) => return usage_error(e),
    };
    let blob = match crate::job::locate_source(&url, &settings) {
        Ok(b) => b,
        Err(e) => return usage_error(e),
    };
    if size_mib == 0 {
        return usage_error("--size-mib must be at least 1");
    }
    let control = match connect(settings) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let image = crate::vhd::sample_image(size_mib, data_mib, 42);
    let len = image.len();
    let result = async {
        control
            .store
            .ensure_container(&blob.account, &blob.container)
            .await?;
        control
            .store
            .put_page_blob(&blob, bytes::Bytes::from(image))
            .await
    }
    .await;
    match result {
        Ok(()) => {
            println!("uploaded a fixed VHD of {len} bytes to {url}");
            ExitCode::SUCCESS
        }
        Err(e) => failed(e),
    }
}

async fn shutdown_signal(stop: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
    stop.cancel();
}
