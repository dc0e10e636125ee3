//! The shared registry on three nodes and one real redis-server
//! (CLUSTER.md test 1 and issue #17 item 2): what one node registers, every
//! node serves at once; clients are listed and dropped cluster-wide; Redis
//! unavailable → the API says so fast while viewers keep watching.

use std::time::{Duration, Instant};

use http::Method;
use serde_json::{json, Value};

use crate::common::{api, config, register};
use crate::support::client::{self, BodyEnd, BodyReader};
use crate::support::cluster::ClusterNodes;
use crate::support::edge::Edge;
use crate::support::provider::Provider;
use crate::support::redis::RedisServer;
use crate::support::webhook::WebhookReceiver;

/// Opens `/stream/{id}` on `node` as `client_id` and checks bytes flow.
async fn watch(nodes: &[Edge], node: usize, id: &str, client_id: &str) -> BodyReader {
    let url = nodes[node].url(&format!("/stream/{id}?client_id={client_id}"));
    let resp = client::get(&url).await;
    assert_eq!(resp.status(), 200, "GET {url}");
    let mut r = BodyReader::new(resp);
    r.read_n(188 * 10, Duration::from_secs(10)).await;
    r
}

/// Reads until the body ends; panics if it is still flowing after `within`.
async fn assert_cut(r: &mut BodyReader, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    loop {
        match r.try_read_n(188 * 100, Duration::from_millis(500)).await {
            Ok(_) => {}
            Err((_, BodyEnd::Timeout)) => {}
            Err(_) => return,
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still receiving after {within:?}"
        );
    }
}

/// Polls the async `cond` every 100 ms until true; panics after `timeout`.
async fn until<F, Fut>(timeout: Duration, what: &str, cond: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn comparable(v: &Value) -> Value {
    let s = &v["stream"];
    json!({
        "stream_id": s["stream_id"],
        "original_url": s["original_url"],
        "metadata": s["metadata"],
        "created_at": s["created_at"],
        "failover_urls": s["failover_urls"],
        "stream_type": s["stream_type"],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_posted_on_one_node_is_served_by_all_and_deleted_everywhere() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Provider::start().await;
    let mut cluster = ClusterNodes::start(&redis, 3, &config("")).await;
    let nodes: &[Edge] = cluster.nodes();
    let url = p.url("live/cl1.ts?kbps=800");
    let id = register(
        &nodes[0],
        json!({"url": url, "metadata": {"provider_profile_id": 7, "id": 1}}),
    )
    .await;

    // Visible on n2 and n3 at once, identical.
    let (s1, v1) = api(&nodes[0], Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(s1, 200, "{v1}");
    for n in [1, 2] {
        let (s, v) = api(&nodes[n], Method::GET, &format!("/streams/{id}"), None).await;
        assert_eq!(s, 200, "n{}: {v}", n + 1);
        assert_eq!(comparable(&v), comparable(&v1), "n{}", n + 1);
        let (s, list) = api(&nodes[n], Method::GET, "/streams", None).await;
        assert_eq!(s, 200);
        assert!(list["streams"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["stream_id"] == id.as_str()));
    }

    // Plays on n3 right away; counted on n1 and n2.
    let mut viewer = watch(nodes, 2, &id, "viewer-n3").await;
    until(
        Duration::from_secs(5),
        "the viewer on n3 counted by n1",
        || async {
            let (_, v) = api(
                &nodes[0],
                Method::GET,
                "/streams/counts-by-metadata?field=provider_profile_id&values=7,8",
                None,
            )
            .await;
            v["counts"]["7"] == 1 && v["counts"]["8"] == 0
        },
    )
    .await;
    let (_, by) = api(
        &nodes[1],
        Method::GET,
        "/streams/by-metadata?field=provider_profile_id&value=7",
        None,
    )
    .await;
    assert_eq!(by["total_matching"], 1, "{by}");
    assert_eq!(by["matching_streams"][0]["client_count"], 1, "{by}");

    // A re-POST while watched (on another node) keeps the stream unchanged.
    let (s, _) = api(
        &nodes[1],
        Method::POST,
        "/streams",
        Some(json!({"url": url, "metadata": {"provider_profile_id": 9}})),
    )
    .await;
    assert_eq!(s, 200);
    let (_, v) = api(&nodes[0], Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(v["stream"]["metadata"]["provider_profile_id"], "7", "{v}");

    // DELETE on n2: n1 answers 404 at once, n3's viewer is cut.
    let (s, v) = api(&nodes[1], Method::DELETE, &format!("/streams/{id}"), None).await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = api(&nodes[0], Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(s, 404);
    let resp = client::get(&nodes[0].url(&format!("/stream/{id}"))).await;
    assert_eq!(resp.status(), 404);
    assert_cut(
        &mut viewer,
        Duration::from_secs(5),
        "the viewer on n3 of a deleted stream",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_and_hls_references_are_shared() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let mut cluster = ClusterNodes::start(&redis, 3, &config("")).await;
    let nodes: &[Edge] = cluster.nodes();
    let (s, v) = api(
        &nodes[0],
        Method::POST,
        "/webhooks",
        Some(json!({"url": hook.url("/cl"), "events": ["client_connected"]})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = api(&nodes[1], Method::GET, "/webhooks", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["webhooks"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["webhooks"][0]["url"], hook.url("/cl"));

    // A playlist rewritten by n1: its signed references work on n2.
    let id = register(
        &nodes[0],
        json!({"url": p.url("files/hls_ts/v0/index.m3u8")}),
    )
    .await;
    let (s, _, body) =
        client::get_body(&nodes[0].url(&format!("/hls/{id}/playlist.m3u8?client_id=h1"))).await;
    assert_eq!(s, 200);
    let body = String::from_utf8_lossy(&body).into_owned();
    let seg = body
        .lines()
        .find(|l| l.contains("/segment.ts?t="))
        .unwrap_or_else(|| panic!("no segment reference in\n{body}"));
    let (s, _, bytes) = client::get_body(&nodes[1].url(seg.trim())).await;
    assert_eq!(s, 200, "a reference minted by n1, asked of n2");
    assert!(!bytes.is_empty() && bytes[0] == 0x47, "TS bytes");

    // The HLS client seen by two nodes connected once; delivered by whoever.
    let got = hook
        .wait_for_events("client_connected", 1, Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), 1, "client_connected");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(hook.events_of("client_connected").len(), 1);

    // Removed on n3: gone on n1.
    let (s, _) = api(
        &nodes[2],
        Method::DELETE,
        &format!("/webhooks?webhook_url={}", urlencode(&hook.url("/cl"))),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (_, v) = api(&nodes[0], Method::GET, "/webhooks", None).await;
    assert_eq!(v["webhooks"].as_array().map(Vec::len), Some(0), "{v}");
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_listed_and_dropped_cluster_wide() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Provider::start().await;
    let mut cluster = ClusterNodes::start(&redis, 3, &config("")).await;
    let nodes: &[Edge] = cluster.nodes();
    let id = register(
        &nodes[0],
        json!({"url": p.url("live/cl3.ts?kbps=800"), "metadata": {"id": 3, "provider_profile_id": 1}}),
    )
    .await;
    let mut a = watch(nodes, 0, &id, "on-n1").await;
    let mut b = watch(nodes, 1, &id, "on-n2").await;
    until(
        Duration::from_secs(5),
        "both clients listed on n3",
        || async {
            let (_, v) = api(&nodes[2], Method::GET, "/clients", None).await;
            let ids: Vec<&str> = v["clients"]
                .as_array()
                .map(|a| a.iter().filter_map(|c| c["client_id"].as_str()).collect())
                .unwrap_or_default();
            v["total_clients"] == 2 && ids.contains(&"on-n1") && ids.contains(&"on-n2")
        },
    )
    .await;
    let (_, v) = api(&nodes[2], Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(v["client_count"], 2, "{v}");
    assert_eq!(v["stream"]["client_count"], 2, "{v}");
    let (_, v) = api(&nodes[2], Method::GET, "/stats", None).await;
    assert_eq!(v["proxy_stats"]["total_clients"], 2, "{v}");

    // The editor's "viewer left" on n2 for a client watching on n1.
    let (s, v) = api(
        &nodes[1],
        Method::DELETE,
        "/streams/by-metadata?field=id&value=3&force=false&client_id=on-n1",
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["deleted_count"], 0, "one client remains: {v}");
    assert_cut(&mut a, Duration::from_secs(5), "the dropped client on n1").await;
    b.read_n(188 * 10, Duration::from_secs(5)).await;
    until(Duration::from_secs(5), "one client left", || async {
        let (_, v) = api(&nodes[0], Method::GET, "/clients", None).await;
        v["total_clients"] == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unavailable_api_503_fast_viewers_keep_watching() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Provider::start().await;
    let mut cluster = ClusterNodes::start(&redis, 2, &config("")).await;
    let nodes: &[Edge] = cluster.nodes();
    let id = register(&nodes[0], json!({"url": p.url("live/cl4.ts?kbps=800")})).await;
    let mut viewer = watch(nodes, 1, &id, "keeps").await;

    redis.pause();
    let started = Instant::now();
    let (s, v) = api(&nodes[0], Method::GET, "/streams", None).await;
    let took = started.elapsed();
    assert_eq!(s, 503, "{v}");
    assert!(
        v["detail"].as_str().is_some_and(|d| d.contains("Redis")),
        "a clear reason: {v}"
    );
    // Generous bound (commands time out after 1 s): "fast" means no hang.
    assert!(took < Duration::from_secs(5), "503 after {took:?}");
    let (s, _) = api(
        &nodes[1],
        Method::POST,
        "/streams",
        Some(json!({"url": p.url("live/x.ts")})),
    )
    .await;
    assert_eq!(s, 503);
    // The viewer keeps receiving while Redis is hung.
    for _ in 0..3 {
        viewer.read_n(188 * 50, Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    redis.resume();
    until(Duration::from_secs(10), "the API answers again", || async {
        api(&nodes[0], Method::GET, "/streams", None).await.0 == 200
    })
    .await;
    viewer.read_n(188 * 50, Duration::from_secs(5)).await;
}

/// A node config with a short `stream_idle_ttl` (expiry and idle sweeps each
/// second) and the YAML webhook `hook` for `events`.
fn quick_body(hook: &str, events: &str) -> String {
    format!(
        "server:\n  listen: \"{{listen}}\"\n  state_file: \"{{state_file}}\"\n  grace_period: \"0s\"\n  \
         stream_idle_ttl: \"4s\"\napi:\n  token: \"{}\"\nupstream:\n  connect_timeout: \"2s\"\n  \
         read_timeout: \"3s\"\nevents:\n  webhooks:\n    - url: \"{hook}\"\n      events: [{events}]\n",
        crate::common::TOKEN
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hls_client_on_three_nodes_connects_and_disconnects_once() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let body = quick_body(&hook.url("/ev"), "client_connected, client_disconnected");
    let mut cluster = ClusterNodes::start(&redis, 3, &body).await;
    let nodes: &[Edge] = cluster.nodes();
    let id = register(
        &nodes[0],
        json!({"url": p.url("hls-live/hls_ts/v0/index.m3u8"), "metadata": {"id": 77}}),
    )
    .await;
    // The player's requests land on n1, n2, n3, n1, ... (round-robin balancer).
    let mut segments = Vec::new();
    for round in 0..6 {
        let n = &nodes[round % 3];
        let (s, _, body) =
            client::get_body(&n.url(&format!("/hls/{id}/playlist.m3u8?client_id=rr"))).await;
        assert_eq!(s, 200, "playlist from n{}", round % 3 + 1);
        let body = String::from_utf8_lossy(&body).into_owned();
        if let Some(seg) = body.lines().rev().find(|l| l.contains("/segment.ts?t=")) {
            segments.push(seg.trim().to_owned());
        }
        let seg = segments.last().expect("a segment reference");
        let (s, _, _) = client::get_body(&nodes[(round + 1) % 3].url(seg)).await;
        assert_eq!(s, 200, "segment from n{}", (round + 1) % 3 + 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (_, v) = api(&nodes[2], Method::GET, "/clients", None).await;
    assert_eq!(
        v["total_clients"], 1,
        "one client however many nodes served it: {v}"
    );
    // Idle: 6 s, plus the 2 s slack of the holds, plus the 1 s sweeps.
    let gone = hook
        .wait_for_events("client_disconnected", 1, Duration::from_secs(20))
        .await;
    assert_eq!(gone.len(), 1, "client_disconnected");
    assert_eq!(gone[0]["data"]["client_id"], "rr");
    assert_eq!(gone[0]["data"]["metadata"]["id"], "77");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        hook.events_of("client_connected").len(),
        1,
        "client_connected once"
    );
    assert_eq!(
        hook.events_of("client_disconnected").len(),
        1,
        "client_disconnected once"
    );
    let (_, v) = api(&nodes[0], Method::GET, "/clients", None).await;
    assert_eq!(v["total_clients"], 0, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_node_leave_once() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let body = quick_body(&hook.url("/ev"), "client_disconnected");
    let mut cluster = ClusterNodes::start(&redis, 3, &body).await;
    let id = {
        let nodes: &[Edge] = cluster.nodes();
        register(&nodes[0], json!({"url": p.url("live/cl6.ts?kbps=800")})).await
    };
    let mut on_n1 = watch(cluster.nodes(), 0, &id, "doomed").await;
    let mut on_n2 = watch(cluster.nodes(), 1, &id, "survivor").await;
    {
        let n3 = &cluster.nodes()[2];
        until(Duration::from_secs(5), "both listed", || async {
            let (_, v) = api(n3, Method::GET, "/clients", None).await;
            v["total_clients"] == 2
        })
        .await;
    }
    on_n1.read_n(188, Duration::from_secs(5)).await;
    cluster.node(0).kill();
    // node_ttl 5 s + a 1 s sweep, with room for a busy machine.
    let nodes: &[Edge] = cluster.nodes();
    until(
        Duration::from_secs(12),
        "the dead node's client gone",
        || async {
            let (_, v) = api(&nodes[2], Method::GET, "/clients", None).await;
            v["total_clients"] == 1 && v["clients"][0]["client_id"] == "survivor"
        },
    )
    .await;
    let gone = hook
        .wait_for_events("client_disconnected", 1, Duration::from_secs(10))
        .await;
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0]["data"]["client_id"], "doomed");
    assert_eq!(gone[0]["data"]["reason"], "node_lost");
    on_n2.read_n(188 * 10, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(hook.events_of("client_disconnected").len(), 1, "once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwatched_api_stream_expires_once_cluster_wide() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let body = quick_body(&hook.url("/ev"), "stream_stopped");
    let mut cluster = ClusterNodes::start(&redis, 3, &body).await;
    let nodes: &[Edge] = cluster.nodes();
    let watched = register(&nodes[0], json!({"url": p.url("live/kept.ts?kbps=800")})).await;
    let idle = register(
        &nodes[1],
        json!({"url": p.url("live/idle.ts"), "metadata": {"id": 9}}),
    )
    .await;
    let mut viewer = watch(nodes, 2, &watched, "v").await;
    // Every node has a copy of the idle one (asked for it).
    for n in nodes {
        let (s, _) = api(n, Method::GET, &format!("/streams/{idle}"), None).await;
        assert_eq!(s, 200);
    }
    until(
        Duration::from_secs(15),
        "the unwatched stream expired",
        || async {
            api(&nodes[0], Method::GET, &format!("/streams/{idle}"), None)
                .await
                .0
                == 404
        },
    )
    .await;
    hook.wait_for_events("stream_stopped", 1, Duration::from_secs(5))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stops: Vec<_> = hook
        .events_of("stream_stopped")
        .into_iter()
        .filter(|e| e["stream_id"] == idle.as_str())
        .collect();
    assert_eq!(stops.len(), 1, "one stream_stopped: {stops:?}");
    assert_eq!(stops[0]["data"]["reason"], "inactive_timeout");
    // The watched one (viewer on n3, registered on n1) stays.
    viewer.read_n(188 * 10, Duration::from_secs(5)).await;
    let (s, _) = api(&nodes[1], Method::GET, &format!("/streams/{watched}"), None).await;
    assert_eq!(s, 200);
}
