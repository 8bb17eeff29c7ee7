//! The daemon: the HTTP API, the intake worker and housekeeping (garbage
//! collection, pruning old job documents) over one control plane, until a
//! shutdown signal.

use crate::control::Control;
use crate::intake::Worker;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Runs the daemon until `stop` fires: the intake worker and the HTTP API.
pub async fn run_daemon(
    control: Control,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    control.ensure().await?;
    let engine = Arc::new(control.engine());
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "HTTP API listening");
    let api_state = crate::api::AppState::new(control.clone(), engine.live());
    let server = {
        let stop = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, crate::api::router(api_state))
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };
    tokio::spawn(housekeeping(control.clone(), stop.clone()));
    tokio::spawn(crate::watch::run(
        control.clone(),
        engine.instance().to_owned(),
        stop.clone(),
    ));
    let worker = Worker::new(
        engine,
        control.intake.clone(),
        control.poison.clone(),
        control.state.clone(),
        control.metrics.clone(),
        control.settings.clone(),
    );
    worker.run(stop.clone()).await;
    stop.cancel();
    server.await??;
    tracing::info!("stopped");
    Ok(())
}

/// Garbage collection every `gc.interval_minutes` (when on), and pruning of old
/// finished job documents every hour (when `gc.job_retention_days` is set).
async fn housekeeping(control: Control, stop: CancellationToken) {
    let gc = &control.settings.gc;
    if gc.interval_minutes == 0 && gc.job_retention_days == 0 {
        return;
    }
    let minutes = if gc.interval_minutes > 0 {
        gc.interval_minutes
    } else {
        60
    };
    let every = std::time::Duration::from_secs(minutes * 60);
    let min_age = time::Duration::hours(gc.min_age_hours as i64);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        if gc.interval_minutes == 0 {
            if let Err(e) = crate::gc::prune_jobs(&control, false).await {
                tracing::warn!(error = %e, "pruning old job documents failed");
            }
            continue;
        }
        match crate::gc::collect(&control, min_age, false).await {
            Ok(r) => tracing::info!(
                removed = r.orphans.len(),
                young = r.young.len(),
                needed = r.needed,
                pruned_jobs = r.pruned_jobs.len(),
                "garbage collection done"
            ),
            Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
        }
    }
}
