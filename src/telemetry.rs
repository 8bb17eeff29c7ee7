//! Logging set-up: human-readable by default, JSON lines on request; `RUST_LOG`
//! overrides the filter. The Azure SDK logs at `warn` unless asked otherwise, so
//! request details stay out of the logs.

use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global subscriber (once; later calls do nothing).
pub(crate) fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,vhd_replicator=info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
