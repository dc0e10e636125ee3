//! Process life after start: SIGHUP reloads, and the order of a graceful
//! shutdown (SIGTERM) or hand-over (`-u`, SIGQUIT to the old process).
//!
//! Pingora stops accepting connections when it broadcasts its shutdown, then
//! sleeps the grace period and drops every runtime, which would cut live
//! viewers after the events service has already stopped (their
//! `client_disconnected` and `stream_stopped` lost, and with them
//! m3u-editor's provider slots). So the order is ours:
//!
//! 1. Pingora's shutdown broadcast: no new connections. On a hand-over (the
//!    listening sockets went to the new process) the state is written and
//!    the state file unlocked now, so the new process can load it and start.
//! 2. `server.grace_period`: requests in flight may finish (it ends early
//!    once no client is left).
//! 3. Every remaining viewer is cut and every live channel closed, with
//!    `client_disconnected` and `stream_stopped` (reason `shutdown`).
//! 4. The last state write (SIGTERM), then the events service drains its
//!    queue and delivers, bounded by `server.shutdown_timeout`.
//! 5. Exit 0. Pingora's own timer (grace + shutdown timeout + 1 s) is only
//!    a backstop.
//!
//! SIGHUP re-reads the config file and applies `log.level`,
//! `events.webhooks` and `streams` ([`App::reload`]); a file with errors is
//! reported and changes nothing. Other settings need a restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::server::{ExecutionPhase, ShutdownWatch};
use pingora::services::background::BackgroundService;
use tokio::sync::broadcast;

use crate::app::App;

/// The `reason` of the events sent for viewers cut at shutdown.
pub const SHUTDOWN_REASON: &str = "shutdown";

/// How long a cluster node waits at shutdown for its owned channels to be
/// given up (each closes its provider, then releases: one Redis call).
const CLUSTER_HANDOVER_WAIT: Duration = Duration::from_secs(3);

pub struct Lifecycle {
    app: Arc<App>,
    /// The config file, re-read on SIGHUP.
    conf: PathBuf,
    /// Pingora's execution phases, to tell a hand-over from a terminate.
    phases: Mutex<Option<broadcast::Receiver<ExecutionPhase>>>,
}

impl Lifecycle {
    pub fn new(app: Arc<App>, conf: PathBuf, phases: broadcast::Receiver<ExecutionPhase>) -> Self {
        Lifecycle {
            app,
            conf,
            phases: Mutex::new(Some(phases)),
        }
    }

    fn reload(&self) {
        tracing::info!(config = %self.conf.display(), "SIGHUP: reloading log.level, events.webhooks and streams");
        match crate::config::load(&self.conf) {
            Ok(new) => self.app.reload(&new),
            Err(e) => {
                tracing::error!(
                    config = %self.conf.display(),
                    "SIGHUP: the config file has errors; nothing reloaded, the running config stays"
                );
                for m in e.messages() {
                    tracing::error!("  {m}");
                }
            }
        }
    }

    /// Whether Pingora handed the listening sockets to a new process.
    fn handing_over(&self) -> bool {
        let mut guard = self.phases.lock();
        let Some(rx) = guard.as_mut() else {
            return false;
        };
        let mut upgrade = false;
        loop {
            match rx.try_recv() {
                Ok(
                    ExecutionPhase::GracefulUpgradeTransferringFds
                    | ExecutionPhase::GracefulUpgradeCloseTimeout,
                ) => upgrade = true,
                Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        upgrade
    }

    async fn shutdown(&self) {
        let app = &self.app;
        let handover = self.handing_over();
        if handover {
            // The new process waits for this lock before loading the state.
            app.final_save();
            app.release_lock();
        }
        if app.cluster.is_some() {
            // Owned channels go to other nodes first (provider closed, then
            // released), so viewers elsewhere keep watching.
            crate::cluster::relay::drain(app, CLUSTER_HANDOVER_WAIT).await;
        }
        if let Some(c) = &app.cluster {
            // HLS streams too: the next node that fetches takes them at once.
            crate::cluster::hls::release_all(c).await;
        }
        let grace = app.config.server.grace_period;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            handover,
            "shutting down: no new connections; requests in flight get the grace period"
        );
        let end = Instant::now() + grace;
        while Instant::now() < end && !app.registry.all_clients().is_empty() {
            tokio::time::sleep(Duration::from_millis(100).min(end - Instant::now())).await;
        }
        // Networks' ffmpeg stop and their files go; no callbacks.
        app.broadcasts.shutdown().await;
        let cut = app.cut_viewers(SHUTDOWN_REASON);
        tracing::info!(
            clients = cut,
            "viewers disconnected and live channels closed"
        );
        // Cluster mode: their departures reach Redis (and their events the
        // queue) before the events are flushed.
        app.registry.flush_clients(Duration::from_secs(2)).await;
        if !handover {
            app.final_save();
        }
        let deadline = app.config.server.shutdown_timeout;
        if !app
            .events
            .finish(deadline + Duration::from_millis(500))
            .await
        {
            tracing::warn!("events not flushed within server.shutdown_timeout");
        }
        tracing::info!("shutdown complete");
    }
}

#[async_trait]
impl BackgroundService for Lifecycle {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // After a daemon fork the pid in the lock file is the parent's.
        self.app.refresh_lock_pid();
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: SIGHUP will end the process");
                None
            }
        };
        loop {
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                r = shutdown.changed() => if r.is_err() { break },
                Some(()) = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.reload(),
            }
        }
        self.shutdown().await;
        // Everything is delivered and written: Pingora would only sleep out
        // the rest of its backstop timer.
        std::process::exit(0);
    }
}
