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
    /// `m3u_edge_cluster_relays_open`: live channels this node is fed over
    /// a relay connection from their owner.
    pub relays_open: IntGauge,
    /// `m3u_edge_cluster_relays_served`: relay connections this node serves
    /// to other nodes as owner.
    pub relays_served: IntGauge,
    /// `m3u_edge_cluster_ownership_changes_total`: channels this node took
    /// or gave up.
    pub ownership_changes: IntCounter,
    /// `m3u_edge_cluster_takeovers_total`: channels this node took over
    /// after their owner was lost or gave them up.
    pub takeovers: IntCounter,
    /// `m3u_edge_cluster_hls_via_owner_total`: HLS playlists and segments
    /// this node got from the stream's owner node instead of the provider.
    pub hls_via_owner: IntCounter,
    /// `m3u_edge_cluster_hls_served_total`: HLS fetches this node answered
    /// for other nodes as the stream's owner.
    pub hls_served: IntCounter,
    /// `m3u_edge_cluster_hls_owner_unreachable_total`: times the owner did
    /// not answer and this node fetched from the provider itself for a while.
    pub hls_owner_unreachable: IntCounter,
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
            relays_open: gauge(
                r,
                "cluster_relays_open",
                "Live channels this node relays from their owner node.",
            )?,
            relays_served: gauge(
                r,
                "cluster_relays_served",
                "Relay connections this node serves to other nodes as a channel's owner.",
            )?,
            ownership_changes: counter(
                r,
                "cluster_ownership_changes_total",
                "Live channels this node took or gave up.",
            )?,
            takeovers: counter(
                r,
                "cluster_takeovers_total",
                "Live channels this node took over after their owner was lost or gave them up.",
            )?,
            hls_via_owner: counter(
                r,
                "cluster_hls_via_owner_total",
                "HLS playlists and segments this node got from the stream's owner node instead of the provider.",
            )?,
            hls_served: counter(
                r,
                "cluster_hls_served_total",
                "HLS fetches this node answered for other nodes as the stream's owner.",
            )?,
            hls_owner_unreachable: counter(
                r,
                "cluster_hls_owner_unreachable_total",
                "Times a stream's HLS owner did not answer and this node fetched from the provider itself for a while.",
            )?,
        })
    }
}
