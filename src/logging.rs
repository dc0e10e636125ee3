//! Log setup: `tracing` with an EnvFilter from RUST_LOG, else `log.level` from
//! the config. `tracing-subscriber`'s log bridge takes Pingora's `log` records.
//! The filter can be replaced at run time ([`reload_level`], on SIGHUP).

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

static HANDLE: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// RUST_LOG when it is set to something (an empty value counts as unset).
fn env_directives() -> Option<String> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

pub fn init(level: &str) {
    let filter = env_directives()
        .and_then(|d| EnvFilter::try_new(d).ok())
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(true)
        // Colour codes only for a person at a terminal: journald and log
        // files get plain `key=value` text that grep and log shippers read.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = HANDLE.set(handle);
    }
}

/// What [`reload_level`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// The new level is in effect.
    Applied,
    /// RUST_LOG is set: it keeps winning over `log.level`.
    EnvWins,
    /// Logging was not set up by [`init`] (tests).
    NotInitialized,
}

/// Applies `level` (a `log.level` value, already validated) unless RUST_LOG
/// is set, which wins as it did at start.
pub fn reload_level(level: &str) -> Result<Reload, String> {
    if env_directives().is_some() {
        return Ok(Reload::EnvWins);
    }
    let Some(handle) = HANDLE.get() else {
        return Ok(Reload::NotInitialized);
    };
    let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    let max = filter.max_level_hint();
    handle.reload(filter).map_err(|e| e.to_string())?;
    // The `log` bridge was capped at the level of the start; let records of
    // the new level through (the filter above still decides).
    log::set_max_level(match max {
        Some(l) if l == tracing::level_filters::LevelFilter::OFF => log::LevelFilter::Off,
        Some(l) if l == tracing::level_filters::LevelFilter::ERROR => log::LevelFilter::Error,
        Some(l) if l == tracing::level_filters::LevelFilter::WARN => log::LevelFilter::Warn,
        Some(l) if l == tracing::level_filters::LevelFilter::INFO => log::LevelFilter::Info,
        Some(l) if l == tracing::level_filters::LevelFilter::DEBUG => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    });
    Ok(Reload::Applied)
}
