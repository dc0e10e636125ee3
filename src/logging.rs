//! Log setup: `tracing` with an EnvFilter from RUST_LOG, else `log.level` from
//! the config. `tracing-subscriber`'s log bridge takes Pingora's `log` records.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        // Colour codes only for a person at a terminal: journald and log
        // files get plain `key=value` text that grep and log shippers read.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
