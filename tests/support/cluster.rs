//! Several real `m3u-edge` nodes on one real `redis-server` (tests/support/redis.rs),
//! each with its own public and internal port on 127.0.0.1, node ids n1..nN and a
//! shared secret: the world of the cluster tests (tests/cluster/).

use std::time::Duration;

use super::edge::{free_port, Edge, StartOpts};
use super::redis::RedisServer;

/// The shared secret of test clusters.
pub const SECRET: &str = "test-secret-0123456789abcdef0123456789";

/// A `cluster:` section for node `id` on `redis_url`, internal port `port`.
pub fn cluster_yaml(redis_url: &str, id: &str, port: u16) -> String {
    format!(
        "cluster:\n  redis_url: {redis_url}\n  node_id: {id}\n  listen: 127.0.0.1:{port}\n  \
         secret: {SECRET}\n  node_ttl: 5s\n  heartbeat: 1s\n"
    )
}

pub struct ClusterNodes {
    redis_url: String,
    body: String,
    nodes: Vec<Edge>,
    internal_ports: Vec<u16>,
}

impl ClusterNodes {
    /// Starts `n` nodes whose YAML is `yaml_body` (with edge.rs placeholders such as
    /// `{listen}` and `{state_file}`; it must not have a `cluster:` section) plus
    /// a `cluster:` section each. Waits for each to answer and join.
    pub async fn start(redis: &RedisServer, n: usize, yaml_body: &str) -> ClusterNodes {
        let mut c = ClusterNodes {
            redis_url: redis.url(),
            body: yaml_body.to_owned(),
            nodes: Vec::new(),
            internal_ports: Vec::new(),
        };
        for _ in 0..n {
            c.add_node().await;
        }
        c
    }

    /// Starts one more node (id `n<k>`), waits until it joined.
    pub async fn add_node(&mut self) -> &mut Edge {
        let k = self.nodes.len() + 1;
        let port = free_port();
        let yaml = format!(
            "{}\n{}",
            self.body,
            cluster_yaml(&self.redis_url, &format!("n{k}"), port)
        );
        let edge = Edge::start_with(&yaml, StartOpts::default()).await;
        self.nodes.push(edge);
        self.internal_ports.push(port);
        let i = self.nodes.len() - 1;
        wait_joined(&self.nodes[i]).await;
        &mut self.nodes[i]
    }

    /// Node `i` (0-based: node(0) is n1).
    pub fn node(&mut self, i: usize) -> &mut Edge {
        &mut self.nodes[i]
    }

    pub fn nodes(&mut self) -> &mut [Edge] {
        &mut self.nodes
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The internal (`cluster.listen`) port of node `i`.
    pub fn internal_port(&self, i: usize) -> u16 {
        self.internal_ports[i]
    }
}

/// Waits (bounded) until `/health` of `edge` says it holds a cluster session.
pub async fn wait_joined(edge: &Edge) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(r) = client.get(edge.url("/health")).send().await {
            if let Ok(v) = r.json::<serde_json::Value>().await {
                if v["cluster"]["session"] == true {
                    return;
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node on port {} did not join the cluster; log:\n{}",
            edge.port(),
            edge.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
