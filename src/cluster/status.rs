//! What `/health` and `/stats` say about the cluster: this node, its peers,
//! Redis. Peers are read every 2 s in the background so the status routes
//! never wait on Redis.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::{Cluster, NodeInfo};

/// Refreshes the peer list and `m3u_edge_cluster_peers`.
pub(super) async fn peer_gauge(cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Ok(nodes) = cluster.live_nodes().await {
            cluster.metrics.peers.set(nodes.len() as i64);
            *cluster.peers.lock() = nodes;
        }
    }
}

impl Cluster {
    /// The live nodes as last read (at most ~2 s old).
    pub fn peers(&self) -> Vec<NodeInfo> {
        self.peers.lock().clone()
    }

    /// Whether this node can serve: it holds a session (a Redis blip shorter
    /// than the fence margin is not a reason to drain it). `/health`
    /// answers 503 otherwise so a balancer drains it.
    pub fn healthy(&self) -> bool {
        self.holds_session()
    }

    /// The `cluster` object of `/health` and `/stats`.
    pub fn status(&self) -> Value {
        let peers: Vec<Value> = self
            .peers()
            .iter()
            .map(|p| json!({"node_id": p.id, "addr": p.addr.to_string(), "self": p.id == self.node_id()}))
            .collect();
        let (owned, relayed) = self.table().counts();
        json!({
            "node_id": self.node_id(),
            "name": self.config.name,
            "advertise": self.advertise().to_string(),
            "redis": if self.redis_up() { "up" } else { "down" },
            "redis_error": if self.redis_up() { None } else { self.last_error() },
            "session": self.holds_session(),
            "peers": peers,
            "channels_owned": owned,
            "channels_relayed": relayed,
        })
    }
}
