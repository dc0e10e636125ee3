//! Joining, peers, the internal listener's authentication, and fencing when
//! Redis hangs: what `/health` and `/stats` report and what a load balancer sees.

use std::time::Duration;

use serde_json::Value;

use crate::support::client::{client, get};
use crate::support::cluster::{cluster_yaml, ClusterNodes};
use crate::support::edge::{free_port, run_bin, Edge};
use crate::support::redis::RedisServer;

const BODY: &str = "server:\n  listen: \"{listen}\"\n  state_file: \"{state_file}\"\n";

async fn health(edge: &Edge) -> (u16, Value) {
    let r = get(&edge.url("/health")).await;
    let status = r.status().as_u16();
    (status, r.json().await.expect("health JSON"))
}

fn peer_ids(v: &Value) -> Vec<String> {
    let mut ids: Vec<String> = v["cluster"]["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["node_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

async fn wait_peers(edge: &Edge, want: &[&str], within: Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (_, v) = health(edge).await;
        let ids = peer_ids(&v);
        if ids == want || std::time::Instant::now() >= deadline {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn nodes_see_each_other_and_a_killed_node_leaves() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let mut c = ClusterNodes::start(&redis, 3, BODY).await;
    for i in 0..3 {
        let ids = wait_peers(c.node(i), &["n1", "n2", "n3"], Duration::from_secs(10)).await;
        assert_eq!(ids, ["n1", "n2", "n3"], "node {i}");
        let (status, v) = health(c.node(i)).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["cluster"]["node_id"], format!("n{}", i + 1));
        assert_eq!(v["cluster"]["redis"], "up");
    }
    let stats: Value = get(&c.node(1).url("/stats")).await.json().await.unwrap();
    assert_eq!(stats["cluster"]["node_id"], "n2");
    let info: Value = get(&c.node(2).url("/info")).await.json().await.unwrap();
    assert_eq!(info["redis"]["enabled"], true);
    assert_eq!(info["redis"]["port"], redis.port());

    c.node(2).kill();
    // node_ttl 5 s, peers re-read every 2 s.
    let ids = wait_peers(c.node(0), &["n1", "n2"], Duration::from_secs(12)).await;
    assert_eq!(ids, ["n1", "n2"]);
}

#[tokio::test]
async fn internal_listener_wants_a_signature_and_the_public_one_has_no_cluster_routes() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let mut c = ClusterNodes::start(&redis, 1, BODY).await;
    let internal = format!("http://127.0.0.1:{}", c.internal_port(0));
    let r = get(&format!("{internal}/_cluster/ping")).await;
    assert_eq!(r.status(), 401);

    let secret = crate::support::cluster::SECRET.as_bytes();
    let mut req = client().get(format!("{internal}/_cluster/ping"));
    for (k, v) in m3u_edge::cluster::auth::sign(secret, "n9", "GET", "/_cluster/ping") {
        req = req.header(k, v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["node"], "n1");

    // A signature over another path does not open this one.
    let mut req = client().get(format!("{internal}/_cluster/ping?x=1"));
    for (k, v) in m3u_edge::cluster::auth::sign(secret, "n9", "GET", "/_cluster/ping") {
        req = req.header(k, v);
    }
    assert_eq!(req.send().await.unwrap().status(), 401);
    let wrong = b"another-secret-0123456789abcdef0123456789";
    let mut req = client().get(format!("{internal}/_cluster/ping"));
    for (k, v) in m3u_edge::cluster::auth::sign(wrong, "n9", "GET", "/_cluster/ping") {
        req = req.header(k, v);
    }
    assert_eq!(req.send().await.unwrap().status(), 401);

    let public = get(&c.node(0).url("/_cluster/ping")).await;
    assert_eq!(public.status(), 404);
}

#[tokio::test]
async fn a_node_fences_while_redis_hangs_and_rejoins_after() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let mut c = ClusterNodes::start(&redis, 1, BODY).await;
    redis.pause();
    // Fenced within node_ttl − 1 s of the last renewal: /health → 503.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (status, v) = loop {
        let (status, v) = health(c.node(0)).await;
        if status == 503 || std::time::Instant::now() >= deadline {
            break (status, v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["cluster"]["session"], false);
    assert_eq!(v["cluster"]["redis"], "down");
    redis.resume();
    crate::support::cluster::wait_joined(c.node(0)).await;
    let (status, _) = health(c.node(0)).await;
    assert_eq!(status, 200);
    let metrics = get(&c.node(0).url("/metrics")).await.text().await.unwrap();
    let fenced = metrics
        .lines()
        .find(|l| l.starts_with("m3u_edge_cluster_fenced_total "))
        .expect("fenced metric");
    assert_ne!(fenced, "m3u_edge_cluster_fenced_total 0", "{metrics}");
}

#[tokio::test]
async fn upgrade_is_refused_in_cluster_mode() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("c.yaml");
    let yaml = format!(
        "server:\n  listen: 127.0.0.1:{}\n  state_file: {}\n{}",
        free_port(),
        dir.path().join("s.json").display(),
        cluster_yaml("redis://127.0.0.1:1/0", "n1", free_port())
    );
    std::fs::write(&conf, yaml).unwrap();
    let out = run_bin(&["-c", conf.to_str().unwrap(), "-u"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not supported in cluster mode"), "{err}");
}
