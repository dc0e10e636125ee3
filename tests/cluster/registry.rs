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
        Duration::from_secs(10),
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
    // /health on n2 counts the viewer on n3 (never waiting on Redis: a
    // snapshot refreshed each second while /health is asked for).
    until(
        Duration::from_secs(10),
        "n3's viewer in n2's /health",
        || async {
            let r = client::get(&nodes[1].url("/health")).await;
            let v: Value = r.json().await.unwrap_or(Value::Null);
            v["stats"]["total_clients"] == 1 && v["stats"]["active_streams"] == 1
        },
    )
    .await;
    // What n3 served shows on n1 (counters flushed each second).
    until(
        Duration::from_secs(10),
        "n3's bytes counted on n1",
        || async {
            let (_, v) = api(&nodes[0], Method::GET, &format!("/streams/{id}"), None).await;
            v["stream"]["total_bytes_served"].as_u64().unwrap_or(0) >= 188 * 10
        },
    )
    .await;

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
    // Players: the bus tells every node within milliseconds (the 1 s
    // re-check covers a lost message).
    until(
        Duration::from_secs(5),
        "n1 refuses a player of it",
        || async {
            client::get(&nodes[0].url(&format!("/stream/{id}")))
                .await
                .status()
                == 404
        },
    )
    .await;
    assert_cut(
        &mut viewer,
        Duration::from_secs(10),
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
    let (s, v) = api(
        &nodes[2],
        Method::POST,
        "/webhooks/test",
        Some(json!({"webhook_url": hook.url("/cl")})),
    )
    .await;
    assert_eq!((s, v["status_code"].as_u64()), (200, Some(200)), "{v}");
    hook.clear();

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

    // Redis holds them: n1's state file keeps neither (a second webhook
    // is still registered when it stops).
    let (s, _) = api(
        &nodes[0],
        Method::POST,
        "/webhooks",
        Some(json!({"url": hook.url("/kept")})),
    )
    .await;
    assert_eq!(s, 200);
    cluster.node(0).stop().await;
    let state = std::fs::read_to_string(cluster.nodes()[0].state_file()).unwrap_or_default();
    assert!(
        !state.contains(&id),
        "API stream in the state file: {state}"
    );
    assert!(
        !state.contains("/kept"),
        "API webhook in the state file: {state}"
    );
    let (_, v) = api(&cluster.nodes()[1], Method::GET, "/webhooks", None).await;
    assert_eq!(v["webhooks"][0]["url"], hook.url("/kept"), "{v}");
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
        Duration::from_secs(10),
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
    assert_cut(&mut a, Duration::from_secs(10), "the dropped client on n1").await;
    b.read_n(188 * 10, Duration::from_secs(5)).await;
    until(Duration::from_secs(10), "one client left", || async {
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
    eprintln!("GET /streams with Redis paused: 503 after {took:?}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yaml_streams_stay_config_but_their_viewers_count_everywhere() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Provider::start().await;
    let yaml = config(&format!(
        "streams:\n  - id: news\n    url: \"{}\"\n    metadata: {{provider_profile_id: \"4\"}}\n",
        p.url("live/news.ts?kbps=800")
    ));
    let mut cluster = ClusterNodes::start(&redis, 3, &yaml).await;
    let nodes: &[Edge] = cluster.nodes();
    let mut v1 = watch(nodes, 0, "news", "yaml-viewer").await;
    until(
        Duration::from_secs(10),
        "n1's viewer of a YAML stream counted on n2",
        || async {
            let (_, v) = api(
                &nodes[1],
                Method::GET,
                "/streams/counts-by-metadata?field=provider_profile_id&values=4",
                None,
            )
            .await;
            v["counts"]["4"] == 1
        },
    )
    .await;
    let (_, v) = api(&nodes[2], Method::GET, "/streams/news", None).await;
    assert_eq!(v["stream"]["client_count"], 1, "{v}");
    assert_eq!(v["clients"][0]["client_id"], "yaml-viewer", "{v}");
    let (_, v) = api(&nodes[2], Method::GET, "/streams", None).await;
    assert_eq!(v["total"], 1, "the YAML stream, listed once: {v}");
    // Read-only on every node, as on one.
    let (s, _) = api(&nodes[1], Method::DELETE, "/streams/news", None).await;
    assert_eq!(s, 409);
    let (s, v) = api(
        &nodes[1],
        Method::POST,
        "/streams",
        Some(json!({"url": p.url("live/news.ts?kbps=800")})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (_, v) = api(&nodes[2], Method::GET, "/streams", None).await;
    assert_eq!(
        v["total"], 2,
        "an API stream of the same URL is another id: {v}"
    );
    v1.read_n(188 * 10, Duration::from_secs(5)).await;
    // The editor's "viewer left" on n3 reaches the YAML stream's viewer on n1.
    let (s, v) = api(
        &nodes[2],
        Method::DELETE,
        "/streams/by-metadata?field=provider_profile_id&value=4&force=false&client_id=yaml-viewer",
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["skipped_streams"][0]["reason"], "configured_stream",
        "{v}"
    );
    assert_cut(
        &mut v1,
        Duration::from_secs(10),
        "the dropped viewer of a YAML stream",
    )
    .await;
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
        until(Duration::from_secs(10), "both listed", || async {
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

    // A node stopped cleanly reports its viewers itself, at once.
    hook.clear();
    cluster.node(1).stop().await;
    let gone = hook
        .wait_for_events("client_disconnected", 1, Duration::from_secs(10))
        .await;
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0]["data"]["client_id"], "survivor");
    assert_ne!(gone[0]["data"]["reason"], "node_lost", "{:?}", gone[0]);
    let (_, v) = api(&cluster.nodes()[2], Method::GET, "/clients", None).await;
    assert_eq!(v["total_clients"], 0, "{v}");
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        hook.events_of("client_disconnected").len(),
        1,
        "not swept again"
    );
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
    hook.wait_for_events("stream_stopped", 1, Duration::from_secs(10))
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

/// API latency on a cluster node (every call goes to Redis) against one
/// node on its state file, same machine, same calls; prints a table. Run:
/// `cargo test --test tests cluster::registry::api_latency -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: prints a table, asserts nothing about time"]
async fn api_latency_cluster_vs_single_node() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Provider::start().await;
    let single = Edge::start(&config("")).await;
    let mut cluster = ClusterNodes::start(&redis, 3, &config("")).await;
    let nodes: &[Edge] = cluster.nodes();
    // 200 API streams with metadata, like a busy m3u-editor.
    for i in 0..200 {
        let body = json!({"url": p.url(&format!("live/lat{i}.ts")), "metadata": {"provider_profile_id": i % 5}});
        register(&single, body.clone()).await;
        register(&nodes[0], body).await;
    }
    let id = {
        use md5::{Digest, Md5};
        hex::encode(Md5::digest(p.url("live/lat7.ts").as_bytes()))
    };
    let calls: [(&str, Method, String); 4] = [
        ("GET /streams/{id}", Method::GET, format!("/streams/{id}")),
        ("GET /streams (200)", Method::GET, "/streams".into()),
        (
            "GET counts-by-metadata",
            Method::GET,
            "/streams/counts-by-metadata?field=provider_profile_id&values=0,1,2".into(),
        ),
        ("POST /streams (re-POST)", Method::POST, "/streams".into()),
    ];
    eprintln!("| call | single p50 ms | single p99 ms | cluster non-owner p50 ms | cluster p99 ms | p50 ratio |");
    eprintln!("|---|---|---|---|---|---|");
    for (name, method, path) in calls {
        let lat = |edge: &Edge| {
            let (method, path) = (method.clone(), path.clone());
            let url = p.url("live/lat7.ts");
            let base = edge.url("");
            async move {
                let c = client::client();
                let mut v = Vec::new();
                for _ in 0..200 {
                    let mut req = c
                        .request(
                            method.clone(),
                            format!("{}{}", base.trim_end_matches('/'), path),
                        )
                        .header("X-API-Token", crate::common::TOKEN);
                    if method == Method::POST {
                        req =
                            req.json(&json!({"url": url, "metadata": {"provider_profile_id": 2}}));
                    }
                    let t = Instant::now();
                    let r = req.send().await.expect("API call");
                    assert!(r.status().is_success(), "{path}: {}", r.status());
                    r.bytes().await.expect("body");
                    v.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                v.sort_by(|a, b| a.total_cmp(b));
                (v[v.len() / 2], v[v.len() * 99 / 100])
            }
        };
        let (s50, s99) = lat(&single).await;
        let (c50, c99) = lat(&nodes[2]).await;
        eprintln!(
            "| {name} | {s50:.2} | {s99:.2} | {c50:.2} | {c99:.2} | {:.2}x |",
            c50 / s50
        );
    }
}

/// The registry's Lua scripts alone, against a real redis-server: their
/// edge cases without three nodes around them.
mod scripts {
    use m3u_edge::cluster::registry::lua;
    use redis::Value;

    use crate::support::redis::RedisServer;

    const P: &str = "m3e:{t}:";

    struct Db(redis::aio::MultiplexedConnection);

    impl Db {
        async fn open(redis: &RedisServer) -> Db {
            let client = redis::Client::open(redis.url()).expect("redis url");
            Db(client
                .get_multiplexed_async_connection()
                .await
                .expect("redis connection"))
        }

        async fn run(&mut self, script: &redis::Script, args: &[&str]) -> Value {
            let mut inv = script.prepare_invoke();
            inv.arg(P);
            for a in args {
                inv.arg(*a);
            }
            inv.invoke_async(&mut self.0).await.expect("script")
        }

        /// A script whose run is once per op (its `once:` key last): a
        /// fresh op each call.
        async fn run_once(&mut self, script: &redis::Script, args: &[&str]) -> Value {
            let key = format!("{P}once:{}", uuid::Uuid::new_v4().simple());
            self.run_op(script, args, &key).await
        }

        async fn run_op(&mut self, script: &redis::Script, args: &[&str], once: &str) -> Value {
            let mut all = args.to_vec();
            all.push(once);
            self.run(script, &all).await
        }

        async fn cmd<T: redis::FromRedisValue>(&mut self, args: &[&str]) -> T {
            let mut c = redis::cmd(args[0]);
            for a in &args[1..] {
                c.arg(*a);
            }
            c.query_async(&mut self.0).await.expect("command")
        }
    }

    fn texts(v: &Value) -> Vec<String> {
        match v {
            Value::Array(a) => a
                .iter()
                .map(|x| match x {
                    Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                    Value::SimpleString(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => String::new(),
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    fn spec(url: &str, meta: &str) -> String {
        format!(r#"{{"url":"{url}","metadata":{meta}}}"#)
    }

    #[tokio::test]
    async fn repost_rule_metadata_index_and_cap() {
        let Some(redis) = RedisServer::start().await else {
            return;
        };
        let mut db = Db::open(&redis).await;
        let a = spec("http://h/a.ts", r#"{"p":"1","id":"5"}"#);
        let b = spec("http://h/a.ts", r#"{"p":"2"}"#);
        let r = texts(&db.run(&lua::REGISTER_SCRIPT, &["s1", &a, "0"]).await);
        assert_eq!(r[0], "created");
        let r = texts(&db.run(&lua::REGISTER_SCRIPT, &["s1", &a, "0"]).await);
        assert_eq!(r[0], "same");
        // A client on any node keeps the stored stream unchanged.
        db.run_once(&lua::JOIN_SCRIPT, &["s1", "c1", "n1", "inf", "{}"])
            .await;
        let r = texts(&db.run(&lua::REGISTER_SCRIPT, &["s1", &b, "0"]).await);
        assert_eq!((r[0].as_str(), r[1].as_str()), ("kept", a.as_str()));
        db.run_once(&lua::LEAVE_SCRIPT, &["s1", "c1", "n1"]).await;
        let r = texts(&db.run(&lua::REGISTER_SCRIPT, &["s1", &b, "0"]).await);
        assert_eq!((r[0].as_str(), r[1].as_str()), ("replaced", b.as_str()));
        let old: Vec<String> = db.cmd(&["SMEMBERS", &format!("{P}meta:p:1")]).await;
        let new: Vec<String> = db.cmd(&["SMEMBERS", &format!("{P}meta:p:2")]).await;
        assert!(old.is_empty(), "the old metadata index is cleared: {old:?}");
        assert_eq!(new, vec!["s1".to_owned()]);
        // The cap counts API streams.
        let r = texts(&db.run(&lua::REGISTER_SCRIPT, &["s2", &a, "1"]).await);
        assert_eq!(r[0], "full");
        let r = texts(&db.run(&lua::DELETE_SCRIPT, &["s1"]).await);
        assert_eq!(r[0], b);
        let r = texts(&db.run(&lua::DELETE_SCRIPT, &["s1"]).await);
        assert!(r.is_empty(), "a second delete finds nothing");
        let left: i64 = db
            .cmd(&["EXISTS", &format!("{P}meta:p:2"), &format!("{P}stream:s1")])
            .await;
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn a_client_held_by_two_nodes_leaves_once_and_dead_nodes_are_swept() {
        let Some(redis) = RedisServer::start().await else {
            return;
        };
        let mut db = Db::open(&redis).await;
        let j = texts(
            &db.run_once(&lua::JOIN_SCRIPT, &["s", "c", "n1", "inf", "{}"])
                .await,
        );
        assert_eq!(j, ["1", "1"], "the first node's ZADD creates the member");
        let j = texts(
            &db.run_once(&lua::JOIN_SCRIPT, &["s", "c", "n2", "60000", "{}"])
                .await,
        );
        assert_eq!(j, ["0", "1"], "a second node's join is not new");
        let l = texts(&db.run_once(&lua::LEAVE_SCRIPT, &["s", "c", "n1"]).await);
        assert_eq!(l, ["0"], "n2 still holds it");
        // The same op sent twice (a retry after a timeout, while the first
        // try did run): the same answer, so its client_disconnected is not lost.
        let op = format!("{P}once:leave-c-n2");
        let l = texts(&db.run_op(&lua::LEAVE_SCRIPT, &["s", "c", "n2"], &op).await);
        assert_eq!(l[0], "1", "the last holder removes it");
        let retry = texts(&db.run_op(&lua::LEAVE_SCRIPT, &["s", "c", "n2"], &op).await);
        assert_eq!(retry, l, "a retry of the op gets the first try's answer");
        let l = texts(&db.run_once(&lua::LEAVE_SCRIPT, &["s", "c", "n2"]).await);
        assert_eq!(l, ["0"], "and only once");

        // n3 is dead (no session key), n4 alive; both hold c2, n3 alone holds c3.
        let _: () = db.cmd(&["SET", &format!("{P}node:n4"), "tok"]).await;
        db.run_once(&lua::JOIN_SCRIPT, &["s", "c2", "n3", "inf", "{}"])
            .await;
        db.run_once(&lua::JOIN_SCRIPT, &["s", "c2", "n4", "inf", "{}"])
            .await;
        db.run_once(
            &lua::JOIN_SCRIPT,
            &["s", "c3", "n3", "inf", r#"{"ip":"1.2.3.4"}"#],
        )
        .await;
        let listed = match db.run(&lua::CLIENTS_SCRIPT, &["all"]).await {
            Value::Array(a) => a.len(),
            _ => 0,
        };
        assert_eq!(listed, 1, "a dead node's viewers are not listed");
        assert!(
            texts(&db.run_once(&lua::SWEEP_NODE_SCRIPT, &["n4"]).await).is_empty(),
            "alive"
        );
        // Right after a stall (no renewal from any node for a while: Redis
        // hung) every session expired at once: nobody is judged dead until
        // renewals have come again for one node_ttl.
        let t: Vec<String> = db.cmd(&["TIME"]).await;
        let now_ms = t[0].parse::<u64>().unwrap_or(0) * 1000;
        let up = format!("{P}up");
        let _: () = db
            .cmd(&["HSET", &up, "since", &now_ms.to_string(), "ttl", "60000"])
            .await;
        assert!(
            texts(&db.run_once(&lua::SWEEP_NODE_SCRIPT, &["n3"]).await).is_empty(),
            "swept right after a stall"
        );
        // Redis just woke from a hang and runs a sweep queued meanwhile
        // before any node renewed: the last beat is older than the stall
        // bound, so nobody is judged dead either.
        let old_beat = now_ms.saturating_sub(10_000).to_string();
        let _: () = db
            .cmd(&[
                "HSET", &up, "since", "0", "beat", &old_beat, "stall", "2000",
            ])
            .await;
        assert!(
            texts(&db.run_once(&lua::SWEEP_NODE_SCRIPT, &["n3"]).await).is_empty(),
            "swept by a script Redis ran on waking, before any renewal"
        );
        let _: () = db
            .cmd(&["HSET", &up, "beat", &now_ms.to_string(), "stall", "60000"])
            .await;
        let swept = match db.run_once(&lua::SWEEP_NODE_SCRIPT, &["n3"]).await {
            Value::Array(a) => a,
            _ => Vec::new(),
        };
        assert_eq!(swept.len(), 1, "only c3 was held by n3 alone: {swept:?}");
        let again = match db.run_once(&lua::SWEEP_NODE_SCRIPT, &["n3"]).await {
            Value::Array(a) => a.len(),
            _ => 0,
        };
        assert_eq!(again, 0, "swept once");
        let n: i64 = db.cmd(&["ZCARD", &format!("{P}clients:s")]).await;
        assert_eq!(n, 1, "c2 stays (n4 holds it)");
    }

    #[tokio::test]
    async fn delete_by_metadata_excludes_drops_and_keeps_watched() {
        let Some(redis) = RedisServer::start().await else {
            return;
        };
        let mut db = Db::open(&redis).await;
        for (id, meta) in [
            ("a", r#"{"p":"1","id":"10"}"#),
            ("b", r#"{"p":"1","id":"11"}"#),
            ("c", r#"{"p":"1","id":"12"}"#),
        ] {
            db.run(
                &lua::REGISTER_SCRIPT,
                &[id, &spec(&format!("http://h/{id}"), meta), "0"],
            )
            .await;
        }
        db.run_once(&lua::JOIN_SCRIPT, &["b", "leaving", "n1", "inf", "{}"])
            .await;
        db.run_once(&lua::JOIN_SCRIPT, &["c", "leaving", "n1", "inf", "{}"])
            .await;
        db.run_once(&lua::JOIN_SCRIPT, &["c", "staying", "n2", "inf", "{}"])
            .await;
        let counts = texts(&db.run(&lua::COUNTS_SCRIPT, &["p", "1", "1", "2"]).await);
        assert_eq!(counts, ["2", "0"], "watched streams per value");
        let counts = texts(&db.run(&lua::COUNTS_SCRIPT, &["p", "0", "1"]).await);
        assert_eq!(counts, ["3"], "all streams per value");
        let v = db
            .run(
                &lua::DELETE_BY_METADATA_SCRIPT,
                &["p", "1", "10", "0", "leaving"],
            )
            .await;
        let Value::Array(parts) = v else {
            panic!("not an array")
        };
        let deleted: Vec<String> = match &parts[0] {
            Value::Array(d) => d.iter().map(|x| texts(x)[0].clone()).collect(),
            _ => Vec::new(),
        };
        let skipped: Vec<Vec<String>> = match &parts[1] {
            Value::Array(d) => d.iter().map(texts).collect(),
            _ => Vec::new(),
        };
        assert_eq!(deleted, ["b"], "b's only client left: deleted");
        assert_eq!(
            skipped,
            [
                vec!["a".to_owned(), "excluded_by_channel_id".into(), "0".into()],
                vec!["c".to_owned(), "has_active_clients".into(), "1".into()],
            ]
        );
        let dropped = match &parts[2] {
            Value::Array(d) => d.len(),
            _ => 0,
        };
        assert_eq!(dropped, 2, "the leaving client dropped from b and c");
        let r = texts(&db.run(&lua::DELETE_OLDEST_SCRIPT, &["p", "1", "\0"]).await);
        assert_eq!(r[0], "a", "the oldest left");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_its_data_cuts_no_viewer() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let mut cluster = ClusterNodes::start(&redis, 3, &config("")).await;
    let nodes: &[Edge] = cluster.nodes();
    let id = register(&nodes[0], json!({"url": p.url("live/lost.ts?kbps=800")})).await;
    let (s, _) = api(
        &nodes[0],
        Method::POST,
        "/webhooks",
        Some(json!({"url": hook.url("/lost")})),
    )
    .await;
    assert_eq!(s, 200);
    let mut viewer = watch(nodes, 1, &id, "stays").await;
    until(Duration::from_secs(10), "the viewer listed", || async {
        api(&nodes[2], Method::GET, "/clients", None).await.1["total_clients"] == 1
    })
    .await;

    // Redis restarted without persistence: everything gone at once.
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("FLUSHALL");

    // The nodes store again what they hold: the stream, its viewer, the webhook.
    until(Duration::from_secs(10), "the registry restored", || async {
        let (s, _) = api(&nodes[2], Method::GET, &format!("/streams/{id}"), None).await;
        let (_, c) = api(&nodes[2], Method::GET, "/clients", None).await;
        let (_, w) = api(&nodes[2], Method::GET, "/webhooks", None).await;
        s == 200 && c["total_clients"] == 1 && w["webhooks"].as_array().map(Vec::len) == Some(1)
    })
    .await;
    for _ in 0..3 {
        viewer.read_n(188 * 50, Duration::from_secs(5)).await;
    }
}
