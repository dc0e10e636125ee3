//! `m3u_edge_cluster_*` families, registered into the app's registry only
//! when `cluster:` is configured.

use prometheus::{IntCounter, IntGauge, Registry};

use crate::metrics::{counter, gauge};

pub struct ClusterMetrics {
    /// `m3u_edge_cluster_redis_up`: 1 while the latest Redis command worked.
    pub redis_up: IntGauge,
    /// `m3u_edge_cluster_redis_errors_total`.
    pub redis_errors: IntCounter,
    /// `m3u_edge_cluster_fenced_total`: times this node lost its session and
    /// closed the provider connections of the channels it owned.
    pub fenced: IntCounter,
    /// `m3u_edge_cluster_session`: 1 while this node holds a live session.
    pub session_ok: IntGauge,
    /// `m3u_edge_cluster_peers`: live nodes, this one included.
    pub peers: IntGauge,
}

impl ClusterMetrics {
    pub fn new(r: &Registry) -> prometheus::Result<ClusterMetrics> {
        Ok(ClusterMetrics {
            redis_up: gauge(
                r,
                "cluster_redis_up",
                "1 while this node's latest Redis command succeeded, else 0.",
            )?,
            redis_errors: counter(
                r,
                "cluster_redis_errors_total",
                "Redis commands that failed or timed out.",
            )?,
            fenced: counter(
                r,
                "cluster_fenced_total",
                "Times this node lost its cluster session and stopped acting as owner.",
            )?,
            session_ok: gauge(
                r,
                "cluster_session",
                "1 while this node holds a live cluster session, else 0.",
            )?,
            peers: gauge(r, "cluster_peers", "Live cluster nodes, this one included.")?,
        })
    }
}
