//! Broadcasts: m3u-editor's "networks", a schedule of VOD items played as
//! one continuous live HLS channel (API-COMPAT-FFMPEG.md §6).
//!
//! m3u-editor drives it: `POST /broadcast/{id}/start` for each programme
//! (stream URL, seek, duration, first segment number, discontinuity),
//! `GET …/status` to poll, `POST …/stop` and `DELETE /broadcast/{id}`, and
//! it expects a callback when a programme ends so it can start the next.
//! Players get `/broadcast/{id}/live.m3u8` (through m3u-editor, which
//! rewrites the bare `live<digits>.ts` lines) and the segments from
//! `/broadcast/{id}/segment/liveN.ts`.
//!
//! Who does what:
//! - [`request`] checks a start body; every value that reaches ffmpeg comes
//!   from a list or a pattern.
//! - [`command`] builds the programme's ffmpeg argv (network protocols only).
//! - [`window`] keeps the live playlist across programmes (numbering,
//!   discontinuities, which old files may go).
//! - [`network`] holds one network's state and supervises its ffmpeg
//!   (spawned with `transcode::process`: no shell, own process group, dies
//!   with m3u-edge, SIGTERM then SIGKILL, reaped).
//! - [`callback`] posts programme callbacks.
//! - [`api`] answers the management routes; `proxy::broadcast` serves the
//!   playlist and segments and counts viewers.
//!
//! ffmpeg runs whether or not anyone watches (that is what a schedule is);
//! it stops on stop, DELETE, at the end of its duration and at shutdown.
//! Each network writes into `{broadcast.work_dir}/broadcast_{id}`, which is
//! emptied at start-up, on a fresh start, on DELETE and at shutdown, and
//! removed `broadcast.keep_stopped` after the network stopped running.

pub mod api;
pub mod callback;
pub mod command;
pub mod network;
pub mod request;
pub mod window;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::BroadcastConfig;
use crate::conn::caps::Caps;
use crate::events::Events;
use crate::registry::{Registry, RegistryLimits, StreamSpec};
use network::Network;

/// The prefix of a network's directory name in the work dir.
const DIR_PREFIX: &str = "broadcast_";

/// Every network m3u-edge knows of.
pub struct Broadcasts {
    pub config: BroadcastConfig,
    networks: Mutex<HashMap<String, Arc<Network>>>,
    /// Running programmes (`broadcast.max_networks`).
    running: Arc<Caps<()>>,
    /// Viewers of networks: a registry of their own, so they are counted,
    /// capped and evented like HLS viewers without being streams.
    pub viewers: Registry,
    pub(crate) callbacks: callback::Callbacks,
}

impl Broadcasts {
    /// Empties the work dir of earlier runs' networks (their ffmpeg died
    /// with the process that started them). The dir itself is made by the
    /// first start.
    pub fn new(config: BroadcastConfig, events: Arc<Events>, limits: RegistryLimits) -> Self {
        let dir = &config.work_dir;
        // Created on the first start; only m3u-edge's own entries go.
        let mut n = 0;
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let ours = e
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(DIR_PREFIX));
            if ours && std::fs::remove_dir_all(e.path()).is_ok() {
                n += 1;
            }
        }
        if n > 0 {
            tracing::info!(work_dir = %dir.display(), removed = n, "broadcast directories of an earlier run removed");
        }
        Broadcasts {
            running: Caps::new(config.max_networks, 0),
            callbacks: callback::Callbacks::new(config.callback_timeout),
            viewers: Registry::with_caps(Some(events), limits),
            networks: Mutex::new(HashMap::new()),
            config,
        }
    }

    pub fn dir_of(&self, id: &str) -> PathBuf {
        self.config.work_dir.join(format!("{DIR_PREFIX}{id}"))
    }

    pub fn get(&self, id: &str) -> Option<Arc<Network>> {
        self.networks.lock().get(id).cloned()
    }

    /// The network `id`, created (not running) when new.
    fn get_or_create(&self, id: &str) -> Arc<Network> {
        let mut map = self.networks.lock();
        if let Some(n) = map.get(id) {
            return n.clone();
        }
        let spec = StreamSpec {
            url: format!("broadcast:{id}"),
            metadata: [
                ("type".to_string(), "broadcast".to_string()),
                ("network_id".to_string(), id.to_string()),
            ]
            .into(),
            live: Some(true),
            ..Default::default()
        };
        let viewers = self.viewers.add_config(id.to_string(), spec);
        let n = Arc::new(Network::new(id, self.dir_of(id), viewers));
        map.insert(id.to_string(), n.clone());
        n
    }

    /// Networks `GET /broadcast` lists, by id.
    pub fn listed(&self) -> Vec<Arc<Network>> {
        let mut v: Vec<_> = self
            .networks
            .lock()
            .values()
            .filter(|n| n.is_listed())
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Viewers of every network, for the gauges.
    pub fn viewer_count(&self) -> usize {
        self.viewers.all_clients().len()
    }

    /// Forgets a network: ffmpeg stopped, files and viewers gone.
    async fn forget(&self, net: &Arc<Network>, reason: &str) {
        net.stop_programme().await;
        let _ = std::fs::remove_dir_all(&net.dir);
        let mut map = self.networks.lock();
        if map.get(&net.id).is_some_and(|n| Arc::ptr_eq(n, net)) {
            map.remove(&net.id);
        }
        drop(map);
        self.viewers.remove(&net.id, reason);
    }

    /// Drops idle viewers and forgets networks stopped for longer than
    /// `broadcast.keep_stopped`.
    pub async fn sweep(&self) {
        for (s, c) in self.viewers.expire_idle_clients() {
            tracing::info!(network_id = %s.id, client = %c.id, "broadcast viewer idle: left");
        }
        let keep = self.config.keep_stopped;
        let stale: Vec<Arc<Network>> = self
            .networks
            .lock()
            .values()
            .filter(|n| {
                let st = n.state.lock();
                st.running.is_none() && st.idle_since.is_some_and(|t| t.elapsed() >= keep)
            })
            .cloned()
            .collect();
        for n in stale {
            let _op = n.ops.lock().await;
            if n.is_running() {
                continue;
            }
            tracing::info!(network_id = %n.id, "broadcast forgotten after broadcast.keep_stopped");
            self.forget(&n, "broadcast_expired").await;
        }
    }

    /// Stops every programme and removes every directory (shutdown).
    pub async fn shutdown(&self) {
        let all: Vec<Arc<Network>> = self.networks.lock().values().cloned().collect();
        if all.is_empty() {
            return;
        }
        let stops = all.iter().map(|n| self.forget(n, "shutdown"));
        futures::future::join_all(stops).await;
        tracing::info!(
            networks = all.len(),
            "broadcasts stopped and their files removed"
        );
    }
}

/// Background upkeep of broadcasts (a Pingora service: tasks spawned before
/// a daemon fork would die).
pub struct Sweeper {
    pub app: Arc<crate::app::App>,
}

/// Often enough that an idle viewer leaves within a second of its timeout.
const SWEEP: Duration = Duration::from_secs(1);

#[async_trait]
impl BackgroundService for Sweeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let started = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => self.app.broadcasts.sweep().await,
                _ = shutdown.changed() => break,
            }
        }
        tracing::debug!(
            seconds = started.elapsed().as_secs(),
            "broadcast sweeper stopped"
        );
    }
}
