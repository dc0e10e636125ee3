//! Background upkeep: API streams nobody watches expire after
//! `server.stream_idle_ttl`; YAML streams never do. A Pingora
//! `BackgroundService`, so it runs in the server's runtime (tasks spawned
//! before a daemon fork would die).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::app::App;

pub struct Housekeeper {
    pub app: Arc<App>,
}

impl Housekeeper {
    /// Sweep often enough that a stream outlives its TTL by at most a quarter
    /// of it, but not more than every second nor less than every 30 s.
    fn interval(&self) -> Duration {
        (self.app.config.server.stream_idle_ttl / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(30))
    }

    /// Drops idle HLS viewers, then removes expired streams; returns how many streams.
    pub fn sweep(&self) -> usize {
        for (s, c) in self.app.registry.expire_idle_clients() {
            tracing::info!(stream_id = %s.id, client = %c.id, "HLS viewer idle: left");
        }
        // In cluster mode unwatched API streams expire cluster-wide
        // (cluster::registry::upkeep), not per node.
        let expired = if self.app.cluster.is_some() {
            Vec::new()
        } else {
            self.app
                .registry
                .expired(self.app.config.server.stream_idle_ttl)
        };
        let mut n = 0;
        for s in expired {
            if self.app.remove_stream(&s.id, "inactive_timeout") {
                n += 1;
            }
        }
        if n > 0 {
            self.app.persist();
        }
        // Freed heap of a burst (an attack, a zapping storm) goes back to
        // the OS instead of staying as RSS.
        crate::conn::trim_heap();
        n
    }
}

#[async_trait]
impl BackgroundService for Housekeeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => { self.sweep(); }
                _ = shutdown.changed() => break,
            }
        }
        // Counters (bytes served) are kept across a restart.
        self.app.persist();
    }
}
