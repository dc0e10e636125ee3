//! Events once across nodes and webhook delivery by one elected node (issue #17
//! item 5, CLUSTER.md test 6): three nodes run, each event reaches the webhook
//! once; a session whose only node is killed with -9 still ends with exactly one
//! `stream_stopped` carrying `provider_profile_id`; deliveries the killed leader
//! had not finished are taken over by the next one.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::config;
use crate::support::client::{self, BodyReader};
use crate::support::cluster::ClusterNodes;
use crate::support::edge::Edge;
use crate::support::provider::Provider;
use crate::support::redis::RedisServer;
use crate::support::webhook::WebhookReceiver;

const T: Duration = Duration::from_secs(20);

/// Streams s0..s2 in the YAML with m3u-editor's metadata; the webhook in the
/// YAML of every node (`hook_extra`: more webhook keys).
fn body(p: &Provider, hook: &str, hook_extra: &str) -> String {
    let mut streams = String::from("streams:\n");
    for i in 0..3 {
        streams.push_str(&format!(
            "  - id: s{i}\n    url: \"{}\"\n    metadata: {{provider_profile_id: \"4{i}\", id: \"{i}\"}}\n",
            p.url(&format!("live/s{i}.ts?kbps=1000"))
        ));
    }
    config(&format!(
        "live:\n  stall_timeout: \"1s\"\n  give_up_after: \"20s\"\n  retry_backoff: \"1s\"\n\
         events:\n  webhooks:\n    - url: \"{hook}\"\n{hook_extra}{streams}"
    ))
}

/// Redis, the provider, the webhook receiver and three nodes with the webhook
/// in their YAML (`hook_extra`: more webhook keys); None without redis-server.
async fn three_nodes(
    hook_extra: &str,
) -> Option<(RedisServer, Provider, WebhookReceiver, ClusterNodes)> {
    let redis = RedisServer::start().await?;
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let c = ClusterNodes::start(&redis, 3, &body(&p, &hook.url("/hook"), hook_extra)).await;
    Some((redis, p, hook, c))
}

async fn watch(e: &Edge, id: &str, client_id: &str) -> BodyReader {
    let resp = client::get(&e.url(&format!("/stream/{id}?client_id={client_id}"))).await;
    assert_eq!(resp.status(), 200, "viewer {client_id} of {id}");
    let mut r = BodyReader::new(resp);
    r.read_n(188 * 100, T).await;
    r
}

fn of_type<'a>(got: &'a [Value], t: &str, stream: &str) -> Vec<&'a Value> {
    got.iter()
        .filter(|b| b["event_type"] == t && b["stream_id"] == stream)
        .collect()
}

fn bodies(hook: &WebhookReceiver) -> Vec<Value> {
    hook.received().into_iter().map(|r| r.body).collect()
}

/// The node (0-based) holding `leader:delivery`, once one does.
async fn leader(redis: &RedisServer) -> usize {
    let deadline = Instant::now() + T;
    loop {
        let reply = redis
            .command(&["GET", "m3e:{m3u-edge}:leader:delivery"])
            .await;
        if let Some(n) = reply
            .lines()
            .nth(1)
            .and_then(|l| l.split(' ').next())
            .and_then(|id| id.strip_prefix('n'))
            .and_then(|k| k.parse::<usize>().ok())
        {
            return n - 1;
        }
        assert!(Instant::now() < deadline, "no delivery leader: {reply:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_reaches_the_webhook_once_though_three_nodes_run() {
    let Some((redis, _p, hook, mut c)) = three_nodes("").await else {
        return;
    };
    let a = watch(c.node(0), "s0", "a").await;
    let b = watch(c.node(1), "s0", "b").await;
    let v = watch(c.node(2), "s0", "c").await;
    let started = hook.wait_for_events("stream_started", 1, T).await;
    assert_eq!(started.len(), 1);
    drop(a);
    drop(b);
    // Two nodes' viewers left; the third still watches: no stop yet.
    let connected = hook.wait_for_events("client_disconnected", 2, T).await;
    assert_eq!(connected.len(), 2, "{:?}", bodies(&hook));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        of_type(&bodies(&hook), "stream_stopped", "s0").is_empty(),
        "stream_stopped while n3 still had a viewer: {:?}",
        bodies(&hook)
    );
    drop(v);
    let stopped = hook.wait_for_events("stream_stopped", 1, T).await;
    assert_eq!(stopped.len(), 1);
    // Late duplicates would come within a couple of poll rounds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = bodies(&hook);
    assert_eq!(of_type(&got, "stream_started", "s0").len(), 1, "{got:?}");
    assert_eq!(of_type(&got, "stream_stopped", "s0").len(), 1, "{got:?}");
    let stop = of_type(&got, "stream_stopped", "s0")[0];
    assert_eq!(stop["data"]["reason"], "last_client_disconnected");
    assert_eq!(stop["data"]["metadata"]["provider_profile_id"], "40");
    assert_eq!(of_type(&got, "client_connected", "s0").len(), 3, "{got:?}");
    assert_eq!(
        of_type(&got, "client_disconnected", "s0").len(),
        3,
        "{got:?}"
    );
    let ids: HashSet<&str> = got.iter().filter_map(|b| b["event_id"].as_str()).collect();
    assert_eq!(
        ids.len(),
        got.len(),
        "an event was delivered twice: {got:?}"
    );
    // Everything delivered was acknowledged.
    let pending = redis
        .command(&["XPENDING", "m3e:{m3u-edge}:events", "delivery"])
        .await;
    assert!(pending.starts_with("*4\r\n:0\r\n"), "{pending:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_session_ends_with_one_stream_stopped() {
    let Some((redis, _p, hook, mut c)) = three_nodes("").await else {
        return;
    };
    let lead = leader(&redis).await;
    // Viewers on one node that is not the delivery leader (the leader's
    // own death is the next test).
    let n = (lead + 1) % 3;
    let v1 = watch(c.node(n), "s1", "x").await;
    let v2 = watch(c.node(n), "s1", "y").await;
    assert_eq!(hook.wait_for_events("stream_started", 1, T).await.len(), 1);
    c.node(n).kill();
    drop((v1, v2));
    let stopped = hook.wait_for_events("stream_stopped", 1, T).await;
    assert_eq!(stopped.len(), 1, "{:?}", bodies(&hook));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = bodies(&hook);
    let stops = of_type(&got, "stream_stopped", "s1");
    assert_eq!(stops.len(), 1, "{got:?}");
    assert_eq!(stops[0]["data"]["reason"], "node_lost");
    assert_eq!(stops[0]["data"]["metadata"]["provider_profile_id"], "41");
    assert_eq!(of_type(&got, "stream_started", "s1").len(), 1);
}

/// An API stream (m3u-editor's case) watched only on a node that is killed:
/// its `node_lost` stop says what the cluster served of it, from the
/// counters every node reports each second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_api_stream_stops_with_the_bytes_served() {
    let Some((redis, p, hook, mut c)) = three_nodes("").await else {
        return;
    };
    let lead = leader(&redis).await;
    let n = (lead + 1) % 3;
    let (status, v) = crate::common::api(
        c.node(lead),
        reqwest::Method::POST,
        "/streams",
        Some(serde_json::json!({
            "url": p.url("live/api-lost.ts?kbps=1000"),
            "metadata": {"provider_profile_id": 52}
        })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let id = v["stream_id"].as_str().expect("stream_id").to_owned();
    let mut v1 = watch(c.node(n), &id, "x").await;
    // A few seconds of bytes, reported to Redis once a second.
    for _ in 0..3 {
        v1.read_n(188 * 500, T).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.node(n).kill();
    drop(v1);
    let stopped = hook.wait_for_events("stream_stopped", 1, T).await;
    assert_eq!(stopped.len(), 1, "{:?}", bodies(&hook));
    let stop = &stopped[0];
    assert_eq!(stop["stream_id"], id.as_str());
    assert_eq!(stop["data"]["reason"], "node_lost");
    assert_eq!(stop["data"]["metadata"]["provider_profile_id"], "52");
    let served = stop["data"]["bytes_served"].as_u64().unwrap_or(0);
    assert!(served >= 188 * 1500, "bytes_served {served}: {stop}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_delivers_what_the_killed_one_had_pending() {
    // Many retries: the receiver refuses until the leader is dead.
    let extra = "      timeout: \"2s\"\n      retry_attempts: 20\n";
    let Some((redis, _p, hook, mut c)) = three_nodes(extra).await else {
        return;
    };
    hook.set_status(500);
    let lead = leader(&redis).await;
    let n = (lead + 1) % 3;
    let v = watch(c.node(n), "s2", "z").await;
    // The leader got the viewer's first event and is retrying it (the
    // webhook's queue keeps order: everything else waits behind it).
    let deadline = Instant::now() + T;
    while hook.count() == 0 {
        assert!(Instant::now() < deadline, "the leader never tried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let event_id = bodies(&hook)[0]["event_id"].clone();
    c.node(lead).kill();
    let killed_at = Instant::now();
    hook.set_status(200);
    // Another node leads within the leadership's 5 s and claims the entry.
    let deadline = Instant::now() + T;
    loop {
        let after: Vec<_> = hook
            .received()
            .into_iter()
            .filter(|r| r.at > killed_at && r.body["event_id"] == event_id)
            .collect();
        if !after.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pending delivery was not taken over: {:?}",
            bodies(&hook)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let new_leader = leader(&redis).await;
    assert_ne!(new_leader, lead);
    // What queued behind it follows: the stream's start, once.
    let started = hook.wait_for_events("stream_started", 1, T).await;
    assert_eq!(started.len(), 1, "{:?}", bodies(&hook));
    drop(v);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_leader_stopping_cleanly_hands_its_last_events_on() {
    let Some((redis, _p, hook, mut c)) = three_nodes("").await else {
        return;
    };
    // Viewers on the leader itself: its own stop events are the last it
    // writes, and another node must deliver them.
    let lead = leader(&redis).await;
    let v = watch(c.node(lead), "s0", "w").await;
    assert_eq!(hook.wait_for_events("stream_started", 1, T).await.len(), 1);
    c.node(lead).stop().await;
    drop(v);
    let stopped = hook.wait_for_events("stream_stopped", 1, T).await;
    assert_eq!(stopped.len(), 1, "{:?}", bodies(&hook));
    assert_eq!(stopped[0]["data"]["metadata"]["provider_profile_id"], "40");
    assert_ne!(leader(&redis).await, lead);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(of_type(&bodies(&hook), "stream_stopped", "s0").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hls_client_round_robined_over_three_nodes_is_one_session() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let body = config(&format!(
        "events:\n  webhooks:\n    - url: \"{}\"\nhls:\n  token_key: \"{}\"\nstreams:\n  - id: h0\n    \
         url: \"{}\"\n    metadata: {{provider_profile_id: \"9\"}}\n",
        hook.url("/hook"),
        // One signing key on every node (the shared registry keeps one in
        // Redis; set here so the test needs only this part).
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
        p.url("hls-live/hls_ts/v0/index.m3u8")
    ));
    let mut c = ClusterNodes::start(&redis, 3, &body).await;
    // The player's requests land on n1, n2, n3, n1, ... (round-robin).
    let mut segment = None;
    for round in 0..6 {
        let n = c.node(round % 3);
        let (s, _, b) = client::get_body(&n.url("/hls/h0/playlist.m3u8?client_id=rr")).await;
        assert_eq!(s, 200, "playlist from n{}", round % 3 + 1);
        let b = String::from_utf8_lossy(&b).into_owned();
        if let Some(seg) = b.lines().rev().find(|l| l.contains("/segment.ts?t=")) {
            segment = Some(seg.trim().to_owned());
        }
        let seg = segment.clone().expect("a segment reference");
        let (s, _, _) = client::get_body(&c.node((round + 1) % 3).url(&seg)).await;
        assert_eq!(s, 200, "segment from n{}", (round + 1) % 3 + 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The client goes idle on every node: one stop, after the last one.
    let stopped = hook
        .wait_for_events("stream_stopped", 1, Duration::from_secs(30))
        .await;
    assert_eq!(stopped.len(), 1, "{:?}", bodies(&hook));
    assert_eq!(stopped[0]["data"]["metadata"]["provider_profile_id"], "9");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = bodies(&hook);
    assert_eq!(of_type(&got, "stream_started", "h0").len(), 1, "{got:?}");
    assert_eq!(of_type(&got, "stream_stopped", "h0").len(), 1, "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_deleted_on_a_third_node_stops_once() {
    let Some((_redis, p, hook, mut c)) = three_nodes("").await else {
        return;
    };
    let id = crate::common::register(
        c.node(0),
        serde_json::json!({"url": p.url("live/del.ts?kbps=1000"), "metadata": {"provider_profile_id": "5"}}),
    )
    .await;
    let _a = watch(c.node(0), &id, "a").await;
    let _b = watch(c.node(2), &id, "b").await;
    assert_eq!(hook.wait_for_events("stream_started", 1, T).await.len(), 1);
    let (s, _) = crate::common::api(
        c.node(1),
        http::Method::DELETE,
        &format!("/streams/{id}"),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let stopped = hook.wait_for_events("stream_stopped", 1, T).await;
    assert_eq!(stopped.len(), 1, "{:?}", bodies(&hook));
    assert_eq!(stopped[0]["data"]["metadata"]["provider_profile_id"], "5");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = bodies(&hook);
    assert_eq!(of_type(&got, "stream_stopped", &id).len(), 1, "{got:?}");
}
