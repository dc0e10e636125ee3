//! Channel ownership and the live relay (issue #17 item 3; CLUSTER.md tests 2, 4, 5,
//! 8, 9, 10): one provider connection per channel across three nodes, viewers on
//! non-owners fed over one internal connection, take-over when the owner dies or
//! freezes, hand-over at SIGTERM, fencing while Redis hangs. Observed at the
//! provider (live responses open at once, sampled every few ms: the peak), in the
//! viewers' bytes (valid TS, clean joins) and in Redis (`own:{s}`).
//!
//! The channel is a YAML stream with the same id on every node, so these tests do
//! not depend on the shared registry.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::support::client::{self, BodyReader};
use crate::support::cluster::{ClusterNodes, SECRET};
use crate::support::edge::Edge;
use crate::support::eventually::eventually;
use crate::support::provider::Provider;
use crate::support::redis::RedisServer;
use crate::support::ts_check::{check_clean_join, is_valid_ts};
use crate::support::webhook::WebhookReceiver;

const T: Duration = Duration::from_secs(15);
/// Bytes a viewer reads to check a join: ~1 s at 800 kbit/s.
const SOME: usize = 188 * 500;

/// A node config with one live channel per `(id, path)`.
fn body(p: &Provider, channels: &[&str]) -> String {
    let mut s = String::from(
        "server:\n  listen: \"{listen}\"\n  state_file: \"{state_file}\"\n  grace_period: \"0s\"\n  shutdown_timeout: \"2s\"\n\
         live:\n  stall_timeout: \"1s\"\n  give_up_after: \"30s\"\n  retry_backoff: \"1s\"\n\
         streams:\n",
    );
    for id in channels {
        s.push_str(&format!(
            "  - id: {id}\n    url: \"{}\"\n    live: true\n",
            p.url(&format!("live/{id}.ts?kbps=800"))
        ));
    }
    s
}

/// The most live responses the provider had open at once for a path prefix,
/// sampled every 5 ms from when it is made.
struct Peak {
    max: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Peak {
    fn watch(p: &Arc<Provider>, prefix: &str) -> Peak {
        let (max, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (p, prefix, m, s) = (p.clone(), prefix.to_owned(), max.clone(), stop.clone());
        tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(p.open_streams(&prefix), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Peak { max, stop }
    }

    fn get(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    fn reset(&self) {
        self.max.store(0, Ordering::Relaxed);
    }
}

impl Drop for Peak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn watch(e: &Edge, id: &str, client_id: &str) -> BodyReader {
    let resp = client::get(&e.url(&format!("/stream/{id}?client_id={client_id}"))).await;
    assert_eq!(resp.status(), 200, "viewer {client_id}");
    BodyReader::new(resp)
}

/// A viewer that joined cleanly (PAT, PMT, keyframe first) and gets valid TS.
async fn joined(e: &Edge, id: &str, client_id: &str) -> BodyReader {
    let mut v = watch(e, id, client_id).await;
    let b = v.read_n(SOME, T).await;
    check_clean_join(&b).unwrap_or_else(|e| panic!("viewer {client_id}: {e}"));
    v
}

async fn cluster_status(e: &Edge) -> Value {
    let v: Value = client::get(&e.url("/health")).await.json().await.unwrap();
    v["cluster"].clone()
}

fn own_key(id: &str) -> String {
    m3u_edge::cluster::Keys::new("m3u-edge").own(id)
}

/// `own:{id}` as `HGETALL` pairs; empty when there is no owner record.
async fn own_record(redis: &RedisServer, id: &str) -> String {
    redis.command(&["HGETALL", &own_key(id)]).await
}

async fn owner_epoch(redis: &RedisServer, id: &str) -> u64 {
    let r = redis.command(&["HGET", &own_key(id), "epoch"]).await;
    // `$N\r\n<epoch>\r\n`
    r.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no epoch in {r:?}"))
}

/// A signed relay request to `port` (a node's internal listener): the status.
async fn relay_status(port: u16, id: &str, epoch: u64) -> u16 {
    let path = format!("/_cluster/live/{id}?epoch={epoch}");
    let mut req = client::client().get(format!("http://127.0.0.1:{port}{path}"));
    for (k, v) in m3u_edge::cluster::auth::sign(SECRET.as_bytes(), "n9", "GET", &path) {
        req = req.header(k, v);
    }
    req.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// Reads on until `n` more bytes arrived; the viewer's socket must stay open.
async fn keeps_watching(v: &mut BodyReader, who: &str, within: Duration) -> bytes::Bytes {
    match v.try_read_n(SOME, within).await {
        Ok(b) => {
            is_valid_ts(&b).unwrap_or_else(|e| panic!("{who}: {e}"));
            b
        }
        Err((got, end)) => panic!("{who}: only {} bytes then {end:?}", got.len()),
    }
}

/// Reads small pieces until bytes flowed again for a while after the longest
/// pause seen; returns that pause (panics when the viewer's body ends).
async fn longest_gap(v: &mut BodyReader, within: Duration) -> Duration {
    let end = std::time::Instant::now() + within;
    let mut last = std::time::Instant::now();
    let (mut gap, mut since_gap) = (Duration::ZERO, 0usize);
    while std::time::Instant::now() < end {
        match v.try_read_n(188 * 10, Duration::from_secs(1)).await {
            Ok(_) => {
                let now = std::time::Instant::now();
                if now - last > gap {
                    gap = now - last;
                    since_gap = 0;
                }
                since_gap += 188 * 10;
                last = now;
                if gap > Duration::from_millis(500) && since_gap >= SOME {
                    break;
                }
            }
            Err((_, crate::support::client::BodyEnd::Timeout)) => {}
            Err((_, end)) => panic!("viewer body ended: {end:?}"),
        }
    }
    gap
}

/// Test 2: 2 + 2 + 1 viewers on n1, n2, n3 share one provider connection; every
/// viewer joins cleanly; n1 owns, n2 and n3 relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_on_three_nodes_share_one_provider_connection() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Arc::new(Provider::start().await);
    let mut c = ClusterNodes::start(&redis, 3, &body(&p, &["ch1"])).await;
    let peak = Peak::watch(&p, "/live/ch1");
    let mut viewers = Vec::new();
    for (node, n) in [(0, 2), (1, 2), (2, 1)] {
        for i in 0..n {
            viewers.push(joined(c.node(node), "ch1", &format!("v{node}{i}")).await);
        }
    }
    for (i, v) in viewers.iter_mut().enumerate() {
        keeps_watching(v, &format!("viewer {i}"), T).await;
    }
    assert_eq!(p.open_streams("/live/ch1"), 1);
    assert_eq!(peak.get(), 1, "provider connections at once");
    assert_eq!(p.hits("/live/ch1"), 1, "one provider request in all");
    let s1 = cluster_status(c.node(0)).await;
    assert_eq!(s1["channels_owned"], 1, "{s1}");
    for i in 1..3 {
        let s = cluster_status(c.node(i)).await;
        assert_eq!(s["channels_relayed"], 1, "node {i}: {s}");
        assert_eq!(s["channels_owned"], 0, "node {i}: {s}");
    }
    let metrics = client::get(&c.node(1).url("/metrics"))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("m3u_edge_cluster_relays_open 1"),
        "{metrics}"
    );
}

/// Test 4: the owner keeps the channel open while a relay is attached; when the
/// last remote viewer leaves the provider connection closes and `own:{x}` is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_remote_viewer_leaving_closes_the_provider_and_releases() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Arc::new(Provider::start().await);
    let mut c = ClusterNodes::start(&redis, 2, &body(&p, &["ch1"])).await;
    let local = joined(c.node(0), "ch1", "local").await;
    let mut remote = joined(c.node(1), "ch1", "remote").await;
    assert!(!own_record(&redis, "ch1").await.starts_with("*0"));
    drop(local);
    // The owner's own viewer left; the relay keeps the channel (and the one
    // provider connection) open.
    keeps_watching(&mut remote, "remote viewer", T).await;
    keeps_watching(&mut remote, "remote viewer", T).await;
    assert_eq!(p.open_streams("/live/ch1"), 1);
    assert_eq!(p.hits("/live/ch1"), 1);
    drop(remote);
    let left = std::time::Instant::now();
    // CLUSTER.md asks for 500 ms; bounded generously for a busy CI machine.
    assert!(
        p.wait_until(Duration::from_secs(3), |p| p.open_streams("/live/ch1") == 0)
            .await,
        "provider connection still open after the last viewer left"
    );
    println!(
        "provider connection closed {:?} after the last remote viewer left",
        left.elapsed()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let r = own_record(&redis, "ch1").await;
        if r.starts_with("*0") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "own:ch1 still there: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = cluster_status(c.node(0)).await;
    assert_eq!(s["channels_owned"], 0, "{s}");
}

/// Test 5: `kill -9` of the owner: viewers on n2 and n3 keep their sockets and get
/// bytes again (valid TS) from the node that took over; one provider connection at a
/// time throughout, one at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_killed_viewers_elsewhere_keep_watching() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Arc::new(Provider::start().await);
    let mut c = ClusterNodes::start(&redis, 3, &body(&p, &["ch1"])).await;
    let peak = Peak::watch(&p, "/live/ch1");
    let _owner_viewer = joined(c.node(0), "ch1", "a").await;
    let mut b = joined(c.node(1), "ch1", "b").await;
    let mut d = joined(c.node(2), "ch1", "c").await;
    let epoch = owner_epoch(&redis, "ch1").await;
    c.node(0).kill();
    // node_ttl 5 s: the take-over comes after the dead owner's session expires.
    let gap = longest_gap(&mut b, Duration::from_secs(20)).await;
    println!("viewer on n2: longest gap without bytes around kill -9 of the owner: {gap:?}");
    keeps_watching(&mut b, "viewer on n2", Duration::from_secs(20)).await;
    keeps_watching(&mut d, "viewer on n3", Duration::from_secs(20)).await;
    keeps_watching(&mut b, "viewer on n2", T).await;
    keeps_watching(&mut d, "viewer on n3", T).await;
    assert_eq!(peak.get(), 1, "provider connections at once");
    assert_eq!(p.open_streams("/live/ch1"), 1);
    assert!(
        owner_epoch(&redis, "ch1").await > epoch,
        "a new owner, a new epoch"
    );
    let mut owners = 0;
    for i in 1..3 {
        owners += cluster_status(c.node(i)).await["channels_owned"]
            .as_u64()
            .unwrap_or(0);
    }
    assert_eq!(owners, 1, "exactly one of n2, n3 owns the channel");
}

/// Test 8: a new node moves no running channel; SIGTERM of a node hands its
/// channels over to a node that relays them, without a second provider connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_node_moves_nothing_and_sigterm_hands_over() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Arc::new(Provider::start().await);
    let yaml = body(&p, &["ch1", "ch2"]);
    let mut c = ClusterNodes::start(&redis, 3, &yaml).await;
    let mut a = joined(c.node(0), "ch1", "a").await;
    let mut b = joined(c.node(1), "ch1", "b").await;
    let before = p.connections_total();
    c.add_node().await;
    keeps_watching(&mut a, "viewer on n1", T).await;
    keeps_watching(&mut b, "viewer on n2", T).await;
    assert_eq!(
        p.connections_total(),
        before,
        "adding n4 reconnected something"
    );
    assert_eq!(p.hits("/live/ch1"), 1);

    // ch2 is opened on n4 first: n4 owns it; n2 relays it.
    let peak = Peak::watch(&p, "/live/ch2");
    let _on4 = joined(c.node(3), "ch2", "x").await;
    let mut on2 = joined(c.node(1), "ch2", "y").await;
    assert_eq!(cluster_status(c.node(3)).await["channels_owned"], 1);
    c.node(3).stop().await;
    keeps_watching(&mut on2, "ch2 viewer on n2", T).await;
    keeps_watching(&mut on2, "ch2 viewer on n2", T).await;
    assert_eq!(peak.get(), 1, "ch2 provider connections at once");
    assert_eq!(p.open_streams("/live/ch2"), 1);
    // n2 took ch2 over; n1 still owns ch1.
    assert_eq!(cluster_status(c.node(1)).await["channels_owned"], 1);
    assert_eq!(cluster_status(c.node(0)).await["channels_owned"], 1);
    keeps_watching(&mut a, "viewer on n1", T).await;
}

/// Test 9: Redis hangs 2 s → nothing changes; 8 s → every node fences, the provider
/// connection closes while viewers stay connected, and after SIGCONT the channel
/// comes back on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hanging_fences_owners_and_viewers_wait() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Arc::new(Provider::start().await);
    let hook = WebhookReceiver::start().await;
    let mut c = ClusterNodes::start(&redis, 2, &with_hook(&body(&p, &["ch1"]), &hook)).await;
    let peak = Peak::watch(&p, "/live/ch1");
    let mut a = joined(c.node(0), "ch1", "a").await;
    let mut b = joined(c.node(1), "ch1", "b").await;

    redis.pause();
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.resume();
    keeps_watching(&mut a, "viewer on n1", T).await;
    keeps_watching(&mut b, "viewer on n2", T).await;
    assert_eq!(
        p.connections_total(),
        1,
        "a 2 s Redis pause reconnected something"
    );

    redis.pause();
    let closed = p
        .wait_until(Duration::from_secs(7), |p| p.open_streams("/live/ch1") == 0)
        .await;
    // Let the pause reach 8 s whatever happened, then check.
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.resume();
    assert!(closed, "fenced owner kept its provider connection");
    // CLUSTER.md: bytes again within 3 s of SIGCONT; bounded generously here.
    assert!(
        p.wait_until(Duration::from_secs(10), |p| p.open_streams("/live/ch1")
            == 1)
            .await,
        "the channel did not come back after Redis did"
    );
    for _ in 0..3 {
        keeps_watching(&mut a, "viewer on n1", T).await;
        keeps_watching(&mut b, "viewer on n2", T).await;
    }
    assert_eq!(p.open_streams("/live/ch1"), 1);
    assert_eq!(peak.get(), 1, "provider connections at once");

    // Events once, though the pause outlived every session (node_ttl 5 s) and
    // calls Redis ran only when it woke up had timed out on the nodes: each
    // stream_started / client_connected has its stop / disconnect.
    drop((a, b));
    let t0 = std::time::Instant::now();
    let balanced = eventually(Duration::from_secs(20), || {
        balanced_events(&hook, &["ch1"], &["a", "b"]).is_ok()
    })
    .await;
    assert!(
        balanced,
        "{:?}\n{}",
        balanced_events(&hook, &["ch1"], &["a", "b"]),
        history(&hook, t0)
    );
}

/// A node config with a webhook for the stream and client events.
fn with_hook(body: &str, hook: &WebhookReceiver) -> String {
    format!(
        "{body}events:\n  webhooks:\n    - url: \"{}\"\n      events: [stream_started, stream_stopped, client_connected, client_disconnected]\n",
        hook.url("/hook")
    )
}

/// Distinct events (by `event_id`: delivery is at least once) per (stream id,
/// type) for stream events and (client id, type) for client events.
fn distinct_events(hook: &WebhookReceiver) -> BTreeMap<(String, String), usize> {
    let mut ids: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for r in hook.received() {
        let who = match r.body["data"]["client_id"].as_str() {
            Some(c) if r.event_type().starts_with("client_") => c.to_owned(),
            _ => r.stream_id().to_owned(),
        };
        ids.entry((who, r.event_type().to_owned()))
            .or_default()
            .insert(r.body["event_id"].as_str().unwrap_or("").to_owned());
    }
    ids.into_iter().map(|(k, v)| (k, v.len())).collect()
}

/// Ok when every stream of `streams` had as many stops as starts (at least
/// one) and every client of `clients` as many disconnects as connects (a
/// viewer refused or cut before it joined has neither); else what differs.
fn balanced_events(
    hook: &WebhookReceiver,
    streams: &[&str],
    clients: &[&str],
) -> Result<(), String> {
    let n = distinct_events(hook);
    let count = |who: &str, ty: &str| {
        n.get(&(who.to_owned(), ty.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    let pairs = streams
        .iter()
        .map(|s| (*s, "stream_started", "stream_stopped", 1))
        .chain(
            clients
                .iter()
                .map(|c| (*c, "client_connected", "client_disconnected", 0)),
        );
    let mut wrong = Vec::new();
    for (who, begin, end, least) in pairs {
        let (b, e) = (count(who, begin), count(who, end));
        if b < least || b != e {
            wrong.push(format!("{who}: {b} {begin}, {e} {end}"));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

/// What the receiver got, one line each, for failure messages.
fn history(hook: &WebhookReceiver, t0: std::time::Instant) -> String {
    hook.received()
        .iter()
        .map(|r| {
            format!(
                "{:+6.1}s {} {} {} {} {}",
                r.at.saturating_duration_since(t0).as_secs_f64()
                    - t0.saturating_duration_since(r.at).as_secs_f64(),
                r.stream_id(),
                r.event_type(),
                r.body["data"]["client_id"],
                r.body["data"]["reason"],
                r.body["event_id"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Test 10: the owner frozen (SIGSTOP) past its session: another node takes over
/// (at most 2 provider connections while the old one is frozen), and the old owner
/// closes its connection soon after SIGCONT; relay requests under the old epoch get
/// 409 on both nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_owner_is_replaced_and_yields_after_resume() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Arc::new(Provider::start().await);
    let mut c = ClusterNodes::start(&redis, 3, &body(&p, &["ch1"])).await;
    let peak = Peak::watch(&p, "/live/ch1");
    let _a = joined(c.node(0), "ch1", "a").await;
    let mut b = joined(c.node(1), "ch1", "b").await;
    let mut d = joined(c.node(2), "ch1", "c").await;
    let old = owner_epoch(&redis, "ch1").await;
    let pid = c.node(0).pid().expect("n1 runs").to_string();
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
    };
    signal("-STOP");
    // Viewers elsewhere get bytes again from a new owner while n1 is frozen.
    let got_b = b.try_read_n(SOME, Duration::from_secs(20)).await;
    let got_d = d.try_read_n(SOME, Duration::from_secs(20)).await;
    let new = owner_epoch(&redis, "ch1").await;
    let peak_frozen = peak.get();
    signal("-CONT");
    assert!(
        got_b.is_ok(),
        "viewer on n2 got nothing while n1 was frozen"
    );
    assert!(
        got_d.is_ok(),
        "viewer on n3 got nothing while n1 was frozen"
    );
    assert!(new > old, "no take-over (epoch {old} → {new})");
    assert!(
        peak_frozen <= 2,
        "{peak_frozen} provider connections while frozen"
    );
    // After SIGCONT n1 finds itself fenced and closes its connection.
    assert!(
        p.wait_until(Duration::from_secs(5), |p| p.open_streams("/live/ch1") == 1)
            .await,
        "the old owner kept its provider connection after SIGCONT"
    );
    peak.reset();
    keeps_watching(&mut b, "viewer on n2", T).await;
    keeps_watching(&mut d, "viewer on n3", T).await;
    assert_eq!(peak.get(), 1);
    for i in 0..3 {
        let status = relay_status(c.internal_port(i), "ch1", old).await;
        assert_eq!(status, 409, "old-epoch relay request to n{}", i + 1);
    }
}

/// `POST /streams/{id}/failover` on a node that only relays the channel switches
/// the owner's provider connection (over the bus and `stream:{s}`); viewers on both
/// nodes stay connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_asked_on_a_relaying_node_switches_the_owner() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Arc::new(Provider::start().await);
    let yaml = failover_yaml(&p, &["live/fa.ts?kbps=800", "live/fb.ts?kbps=800"]);
    let mut c = ClusterNodes::start(&redis, 2, &yaml).await;
    let mut a = joined(c.node(0), "fo", "a").await;
    let mut b = joined(c.node(1), "fo", "b").await;
    assert_eq!(p.open_streams("/live/fa"), 1);
    force_failover(c.node(1), "fo").await;
    assert!(
        p.wait_until(T, |p| p.open_streams("/live/fb") == 1
            && p.open_streams("/live/fa") == 0)
            .await,
        "the owner did not switch to the failover source"
    );
    keeps_watching(&mut a, "viewer on n1", T).await;
    keeps_watching(&mut b, "viewer on n2", T).await;
    assert_eq!(p.open_streams("/live/"), 1);
    // Every node's API shows where the owner (n1) has the channel now:
    // m3u-editor reads current_url and the failover fields on any node.
    nodes_show_the_source(&mut c, "fo", &p.url("live/fb.ts?kbps=800"), 0, 1).await;
}

/// The owner's primary drops; it fails over on its own. A node that only
/// relays the channel shows the backup too, with the owner's failover count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owners_failover_shows_on_every_node() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Arc::new(Provider::start().await);
    let yaml = failover_yaml(
        &p,
        &[
            "live/fa.ts?kbps=4000&drop_after=600000",
            "live/fb.ts?kbps=4000",
            "live/fc.ts?kbps=4000",
        ],
    );
    let mut c = ClusterNodes::start(&redis, 2, &yaml).await;
    let mut a = joined(c.node(0), "fo", "a").await;
    let mut b = joined(c.node(1), "fo", "b").await;
    assert!(
        p.wait_until(T, |p| p.open_streams("/live/fb") == 1).await,
        "the owner did not fail over"
    );
    keeps_watching(&mut a, "viewer on n1", T).await;
    keeps_watching(&mut b, "viewer on n2", T).await;
    nodes_show_the_source(&mut c, "fo", &p.url("live/fb.ts?kbps=4000"), 0, 1).await;
    // A failover asked on the relaying node goes on from where the owner
    // is (fb, index 0) to the next source, not back to fb.
    let v = force_failover(c.node(1), "fo").await;
    assert_eq!(v["new_url"], p.url("live/fc.ts?kbps=4000"), "{v}");
    assert_eq!(v["failover_index"], 1, "{v}");
    assert!(
        p.wait_until(T, |p| p.open_streams("/live/fc") == 1
            && p.open_streams("/live/fb") == 0)
            .await,
        "the owner did not switch to the third source"
    );
    keeps_watching(&mut a, "viewer on n1", T).await;
    keeps_watching(&mut b, "viewer on n2", T).await;
    nodes_show_the_source(&mut c, "fo", &p.url("live/fc.ts?kbps=4000"), 1, 2).await;
}

/// Stream `fo` (live) on the provider's `paths`: the first is the primary, the
/// rest its failover URLs in order.
fn failover_yaml(p: &Provider, paths: &[&str]) -> String {
    let mut yaml = format!(
        "server:\n  listen: \"{{listen}}\"\n  state_file: \"{{state_file}}\"\n  grace_period: \"0s\"\n\
         live:\n  stall_timeout: \"1s\"\n  retry_backoff: \"1s\"\n\
         streams:\n  - id: fo\n    url: \"{}\"\n    live: true\n    failover_urls:\n",
        p.url(paths[0])
    );
    for path in &paths[1..] {
        yaml.push_str(&format!("      - \"{}\"\n", p.url(path)));
    }
    yaml
}

/// `POST /streams/{id}/failover` on `e`; its 200 reply.
async fn force_failover(e: &Edge, id: &str) -> Value {
    let path = format!("/streams/{id}/failover");
    let (status, v) = client::api(e, http::Method::POST, &path, None, None).await;
    assert_eq!(status, 200, "{v}");
    v
}

/// Waits until `GET /streams/{id}` on every node shows `url` as the current
/// source at failover `index`, with the same attempts (at least `attempts`)
/// and a failover time.
async fn nodes_show_the_source(
    c: &mut ClusterNodes,
    id: &str,
    url: &str,
    index: i64,
    attempts: u64,
) {
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + T;
    loop {
        seen.clear();
        for i in 0..c.len() {
            let path = format!("/streams/{id}");
            let (_, v) = client::api(c.node(i), http::Method::GET, &path, None, None).await;
            let s = &v["stream"];
            let created = s["created_at"].as_str().unwrap_or("");
            assert!(
                created.starts_with("20"),
                "node {i}: created_at {created:?} of a YAML stream"
            );
            seen.push((
                s["current_url"].clone(),
                s["current_failover_index"].clone(),
                s["failover_attempts"].clone(),
                s["last_failover_time"].is_string(),
            ));
        }
        let same = seen.iter().all(|x| *x == seen[0]);
        if same
            && seen[0].0 == url
            && seen[0].1 == index
            && seen[0].2.as_u64() >= Some(attempts)
            && seen[0].3
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nodes disagree on the source of {id}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Relaying nodes send no `stream_started` and no `failover_triggered`: only the
/// owner, whose reader opened the provider, does (issue #17 item 5 makes the
/// owner's events once-only across take-overs through `sess:{s}`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_sends_stream_started() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Arc::new(Provider::start().await);
    let hook = crate::support::webhook::WebhookReceiver::start().await;
    let yaml = format!(
        "{}events:\n  webhooks:\n    - url: \"{}\"\n      events: [stream_started, failover_triggered]\n",
        body(&p, &["ch1"]),
        hook.url("/hook")
    );
    let mut c = ClusterNodes::start(&redis, 3, &yaml).await;
    let mut viewers = Vec::new();
    for i in 0..3 {
        viewers.push(joined(c.node(i), "ch1", &format!("v{i}")).await);
    }
    assert!(
        eventually(T, || hook.events_of("stream_started").len() == 1).await,
        "no stream_started"
    );
    for (i, v) in viewers.iter_mut().enumerate() {
        keeps_watching(v, &format!("viewer {i}"), T).await;
    }
    assert_eq!(hook.events_of("stream_started").len(), 1);
    assert_eq!(hook.events_of("failover_triggered").len(), 0);
}

/// The bounded randomized "nemesis" run (CLUSTER.md): three nodes and two channels
/// for ~90 s while viewers come and go on random nodes, nodes are `kill -9`ed (and
/// replaced by new ones), frozen with SIGSTOP for 2–7 s, and Redis hangs for 1–6 s.
/// It checks from the recorded history that no channel ever had more than one
/// provider connection outside the declared pauses (a frozen owner may hold a
/// second one until ~1.5 s after SIGCONT); that at the end every channel with
/// viewers is back on exactly one connection; that every node's `/clients` then
/// lists exactly the viewers still connected, and none within `node_ttl` + a few
/// seconds after they all leave; and that the webhook got exactly one
/// `stream_stopped` per `stream_started` of each channel (events deduplicated by
/// `event_id`, as delivery is at-least-once across a leader change).
///
/// Ignored by default (long, and it loads the machine). Run it with
/// `cargo test --test tests cluster::relay::nemesis -- --ignored --nocapture`;
/// `NEMESIS_SEED=<n>` replays a run (the seed is printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn nemesis() {
    use rand::{Rng, SeedableRng};
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let seed: u64 = std::env::var("NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("nemesis seed: {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let p = Arc::new(Provider::start().await);
    let channels = ["nx1", "nx2"];
    let hook = WebhookReceiver::start().await;
    let yaml = with_hook(&body(&p, &channels), &hook);
    let mut c = ClusterNodes::start(&redis, 3, &yaml).await;
    // Violations: (seconds into the run, channel, connections) outside a pause.
    let pausing = Arc::new(AtomicUsize::new(0));
    let violations = Arc::new(parking_lot::Mutex::new(Vec::<(f64, String, usize)>::new()));
    let done = Arc::new(AtomicBool::new(false));
    let t0 = std::time::Instant::now();
    {
        let (p, pausing, violations, done) =
            (p.clone(), pausing.clone(), violations.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                for ch in ["nx1", "nx2"] {
                    let n = p.open_streams(&format!("/live/{ch}."));
                    if n > 1 && pausing.load(Ordering::Relaxed) == 0 {
                        violations
                            .lock()
                            .push((t0.elapsed().as_secs_f64(), ch.to_owned(), n));
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    // Viewers: reader tasks that drain their sockets; dropping one leaves.
    let mut viewers: Vec<(usize, &str, String, tokio::task::JoinHandle<()>)> = Vec::new();
    // Every viewer ever started: (node, channel, client id).
    let mut all_viewers: Vec<(usize, &str, String)> = Vec::new();
    let mut alive: Vec<bool> = vec![true; 3];
    let end = std::time::Instant::now() + Duration::from_secs(90);
    let mut k = 0;
    while std::time::Instant::now() < end {
        k += 1;
        let live: Vec<usize> = (0..alive.len()).filter(|&i| alive[i]).collect();
        match rng.gen_range(0..10) {
            0..=4 => {
                let node = live[rng.gen_range(0..live.len())];
                let ch = channels[rng.gen_range(0..channels.len())];
                let id = format!("nv{k}");
                let url = c.node(node).url(&format!("/stream/{ch}?client_id={id}"));
                let task = tokio::spawn(async move {
                    let Ok(mut r) = client::client().get(url).send().await else {
                        return;
                    };
                    while let Ok(Some(_)) = r.chunk().await {}
                });
                all_viewers.push((node, ch, id.clone()));
                viewers.push((node, ch, id, task));
            }
            5 | 6 if !viewers.is_empty() => {
                let (_, _, _, t) = viewers.swap_remove(rng.gen_range(0..viewers.len()));
                t.abort();
            }
            7 if live.len() > 2 => {
                let node = live[rng.gen_range(0..live.len())];
                println!("{:5.1}s kill -9 n{}", t0.elapsed().as_secs_f64(), node + 1);
                c.node(node).kill();
                alive[node] = false;
                viewers.retain(|(n, _, _, t)| {
                    if *n == node {
                        t.abort();
                    }
                    *n != node
                });
                c.add_node().await;
                alive.push(true);
            }
            8 => {
                let node = live[rng.gen_range(0..live.len())];
                let secs = rng.gen_range(2..=7);
                println!(
                    "{:5.1}s SIGSTOP n{} for {secs} s",
                    t0.elapsed().as_secs_f64(),
                    node + 1
                );
                let pid = c.node(node).pid().expect("running").to_string();
                pausing.fetch_add(1, Ordering::Relaxed);
                let _ = std::process::Command::new("kill")
                    .args(["-STOP", &pid])
                    .status();
                tokio::time::sleep(Duration::from_secs(secs)).await;
                let _ = std::process::Command::new("kill")
                    .args(["-CONT", &pid])
                    .status();
                // The old owner closes within ~1.5 s of resuming.
                tokio::time::sleep(Duration::from_secs(3)).await;
                pausing.fetch_sub(1, Ordering::Relaxed);
            }
            9 => {
                let ms = rng.gen_range(1000..=6000);
                println!("{:5.1}s Redis paused {ms} ms", t0.elapsed().as_secs_f64());
                pausing.fetch_add(1, Ordering::Relaxed);
                redis.pause();
                tokio::time::sleep(Duration::from_millis(ms)).await;
                redis.resume();
                tokio::time::sleep(Duration::from_secs(3)).await;
                pausing.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..1500))).await;
    }
    // Quiet: every channel with viewers settles on one connection.
    viewers.retain(|(_, _, _, t)| !t.is_finished());
    let watched: Vec<&str> = channels
        .iter()
        .copied()
        .filter(|ch| viewers.iter().any(|(_, c, _, _)| c == ch))
        .collect();
    let settled = p
        .wait_until(Duration::from_secs(20), |p| {
            channels.iter().all(|ch| {
                let n = p.open_streams(&format!("/live/{ch}."));
                if watched.contains(ch) {
                    n == 1
                } else {
                    n == 0
                }
            })
        })
        .await;
    done.store(true, Ordering::Relaxed);
    let v = violations.lock().clone();
    assert!(
        v.is_empty(),
        "seed {seed}: more than one provider connection: {:?}",
        &v[..v.len().min(20)]
    );
    assert!(
        settled,
        "seed {seed}: channels did not settle on one connection each (watched {watched:?}): {:?}",
        channels.map(|ch| p.open_streams(&format!("/live/{ch}.")))
    );
    // Counts converge: every live node lists exactly the viewers still connected
    // (a killed node's viewers are gone after node_ttl), then none once they leave.
    let live_nodes: Vec<usize> = (0..alive.len()).filter(|&i| alive[i]).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    loop {
        let want: std::collections::BTreeSet<String> = viewers
            .iter()
            .filter(|(_, _, _, t)| !t.is_finished())
            .map(|(_, _, id, _)| id.clone())
            .collect();
        let mut listed = std::collections::BTreeMap::new();
        for &i in &live_nodes {
            listed.insert(i, listed_clients(c.node(i)).await);
        }
        if listed.values().all(|l| *l == want) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "seed {seed}: /clients per node {listed:?} != viewers still connected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (_, _, _, t) in &viewers {
        t.abort();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    for &i in &live_nodes {
        loop {
            let l = listed_clients(c.node(i)).await;
            if l.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "seed {seed}: n{} still lists {l:?} after every viewer left",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Events once: per channel as many stops as starts, per viewer as many
    // disconnects as connects (after dedup by event_id).
    let ids: Vec<String> = all_viewers.iter().map(|(_, _, id)| id.clone()).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let watched_ever: Vec<&str> = channels
        .iter()
        .copied()
        .filter(|ch| all_viewers.iter().any(|(_, c, _)| c == ch))
        .collect();
    let balanced = eventually(Duration::from_secs(20), || {
        balanced_events(&hook, &watched_ever, &ids).is_ok()
    })
    .await;
    assert!(
        balanced,
        "seed {seed}: {:?}\n{}",
        balanced_events(&hook, &watched_ever, &ids),
        history(&hook, t0)
    );
}

/// The client ids `GET /clients` of a node lists.
async fn listed_clients(edge: &Edge) -> std::collections::BTreeSet<String> {
    let Ok(r) = client::client()
        .get(edge.url("/clients"))
        .timeout(Duration::from_secs(3))
        .send()
        .await
    else {
        return ["<no answer>".to_owned()].into();
    };
    let v: Value = r.json().await.unwrap_or(Value::Null);
    v["clients"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["client_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_else(|| ["<bad answer>".to_owned()].into())
}

/// The owner's live/file detection is shared in `stream:{s}.detected`: once n1
/// found the stream is a file, n2 proxies it per client at once, without opening
/// a hub connection to find out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_detection_is_shared_between_nodes() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Arc::new(Provider::start().await);
    let yaml = format!(
        "server:\n  listen: \"{{listen}}\"\n  state_file: \"{{state_file}}\"\n  grace_period: \"0s\"\n\
         streams:\n  - id: f1\n    url: \"{}\"\n",
        p.url("files/sample.ts"),
    );
    let mut c = ClusterNodes::start(&redis, 2, &yaml).await;
    let size = crate::support::fixture("sample.ts").len();
    let (status, _, body) = client::get_body(&c.node(0).url("/stream/f1")).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), size);
    // The hub's first response showed a file; then the per-client request.
    assert_eq!(p.hits("/files/sample.ts"), 2);
    // n1 writes what it found once its probe connection closed, just
    // after the body ended here.
    let key = m3u_edge::cluster::Keys::new("m3u-edge").stream("f1");
    let mut detected = String::new();
    for _ in 0..50 {
        detected = redis.command(&["HGET", &key, "detected"]).await;
        if detected.contains("file") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        detected.contains("file"),
        "stream:f1 detected = {detected:?}"
    );
    let (status, _, body) = client::get_body(&c.node(1).url("/stream/f1")).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), size);
    assert_eq!(p.hits("/files/sample.ts"), 3, "n2 probed the file again");
}

/// When every source fails on the owner for `live.give_up_after`, the channel ends
/// everywhere: relaying nodes end their viewers too instead of taking the channel
/// over and trying the provider again in turn (no second take: `epoch` stays 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_that_failed_on_its_owner_ends_on_every_node() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Arc::new(Provider::start().await);
    let yaml = format!(
        "server:\n  listen: \"{{listen}}\"\n  state_file: \"{{state_file}}\"\n  grace_period: \"0s\"\n\
         live:\n  stall_timeout: \"1s\"\n  give_up_after: \"2s\"\n  retry_backoff: \"500ms\"\n\
         streams:\n  - id: g1\n    url: \"{}\"\n    live: true\n",
        p.url("live/g1.ts?kbps=800&drop_after=300000"),
    );
    let mut c = ClusterNodes::start(&redis, 2, &yaml).await;
    let mut a = joined(c.node(0), "g1", "a").await;
    let mut b = joined(c.node(1), "g1", "b").await;
    // From now on the source is gone: the open connection ends after its bytes.
    p.set_status("/live/g1.ts", 404);
    for (v, who) in [(&mut a, "viewer on n1"), (&mut b, "viewer on n2")] {
        let end = loop {
            match v.try_read_n(188 * 100, Duration::from_secs(20)).await {
                Ok(_) => continue,
                Err((_, end)) => break end,
            }
        };
        assert!(
            !matches!(end, crate::support::client::BodyEnd::Timeout),
            "{who}: still open 20 s after its source failed"
        );
    }
    let epoch = redis
        .command(&["GET", &m3u_edge::cluster::Keys::new("m3u-edge").epoch()])
        .await;
    assert_eq!(
        epoch.lines().nth(1),
        Some("1"),
        "a node took the failed channel over: epoch {epoch:?}"
    );
}
